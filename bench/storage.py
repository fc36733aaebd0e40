"""Storage benchmark: coralfs vs compressors, delta tools and dedup backups.

Each checkpoint series of ``bench/corpus.py`` is committed to a fresh coralfs
repository, one commit per checkpoint, in order, always at the same path (a model
directory keeps its layout), as a user would. The same files go through the peers
(see ``bench/peers.py``) in the same process. Printed (markdown):

* per series: raw bytes, then stored bytes and ratio (raw / stored) for coralfs and
  every peer, and coralfs vs the best peer;
* coralfs's breakdown by codec, per series;
* for ``scratch_pt``: an order-0 entropy estimate of the XOR-residual byte planes of
  consecutive checkpoints (the "floor" a plane-wise entropy coder could reach) vs what
  coralfs stored;
* throughput: coralfs ingest (add + commit) vs ``zstd -3 -T2`` on the largest file,
  and read-back of the newest version of the longest series vs ``zstd -d``;
* the storage targets with PASS/FAIL (``targets()``).

Every coralfs read-back (every version of every series, and each timed read) is
checked by sha256 against the original file; a mismatch aborts the run.

Usage::

    python bench/storage.py [--small] [--series a,b] [--skip-peers x,y] [--out results.md]

The machine may be shared: absolute speeds are noisy, ratios from one run are what
count (timings are the best of ``--repeats`` runs).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import peers  # noqa: E402
from coralfs.formats import split  # noqa: E402
from coralfs.repository import Repository  # noqa: E402

SERIES: tuple[str, ...] = ("scratch_pt", "finetune_fp32", "finetune_bf16", "partial_ft", "model_dir")
READ_BLOCK = 8 << 20
MB = 1e6
TARGET_FINETUNE = 1.3  # coralfs stores >= 1.3x fewer bytes than the best peer
TARGET_SPEED = 0.5  # coralfs >= 0.5x the zstd reference speed

Version = dict[str, Path]  # repository path -> source file


class BenchError(RuntimeError):
    """A check failed (e.g. a read-back that is not bit-exact)."""


def log(msg: str) -> None:
    print(f"[storage] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- corpus -> versions
def to_versions(items: Sequence[Path]) -> list[Version]:
    """Series items (files, or version directories) -> per version {repo path: source file}.

    Single files always go to the same path (``checkpoint<suffix>``) so deltas chain."""
    out: list[Version] = []
    for it in items:
        it = Path(it)
        if it.is_dir():
            out.append({p.relative_to(it).as_posix(): p for p in sorted(it.rglob("*")) if p.is_file()})
        else:
            out.append({f"checkpoint{it.suffix}": it})
    return out


def place(version: Version, work: Path, previous: Iterable[str] = ()) -> None:
    """Make ``work`` hold exactly ``version`` (hard links where possible: the corpus is never written)."""
    for rel in set(previous) - set(version):
        (work / rel).unlink(missing_ok=True)
    for rel, src in version.items():
        dst = work / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".bench-tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


_SHA_CACHE: dict[Path, str] = {}


def sha256_file(path: Path) -> str:
    h = _SHA_CACHE.get(path)
    if h is None:
        d = hashlib.sha256()
        with open(path, "rb") as f:
            while b := f.read(READ_BLOCK):
                d.update(b)
        h = _SHA_CACHE[path] = d.hexdigest()
    return h


def version_bytes(v: Version) -> int:
    return sum(p.stat().st_size for p in v.values())


# ---------------------------------------------------------------------------- coralfs
@dataclass
class CoralResult:
    root: Path
    commits: list[bytes]
    ingest_seconds: list[float]
    version_stored: list[int]  # new record bytes written per version (IngestStats.stored)
    stats: dict[str, Any]
    verified_files: int = 0


def run_coralfs(versions: list[Version], root: Path) -> CoralResult:
    repo = Repository.init(root)
    commits: list[bytes] = []
    seconds: list[float] = []
    stored: list[int] = []
    prev: set[str] = set()
    try:
        for i, v in enumerate(versions):
            place(v, root, prev)
            paths = [root / rel for rel in sorted(set(v) | prev)]  # a vanished path stages a deletion
            t0 = time.perf_counter()
            st = repo.add(paths)
            commits.append(repo.commit(f"v{i:03d}", allow_empty=True))
            seconds.append(time.perf_counter() - t0)
            stored.append(st.stored)
            prev = set(v)
        repo.wait_repack()  # the last replaced versions: re-encoded in the background
        stats = repo.stats()
    finally:
        repo.close()
    return CoralResult(root, commits, seconds, stored, stats)


def read_coralfs(root: Path, rev: bytes, rel: str) -> tuple[list[bytes], float]:
    """Read ``rev:rel`` with a fresh Repository (cold object cache) in 8 MiB blocks."""
    repo = Repository(root)
    try:
        t0 = time.perf_counter()
        blocks = []
        with repo.open(rev, rel) as f:
            while b := f.read(READ_BLOCK):
                blocks.append(b)
        dt = time.perf_counter() - t0
    finally:
        repo.close()
    return blocks, dt


def check_blocks(blocks: list[bytes], src: Path, what: str) -> None:
    d = hashlib.sha256()
    for b in blocks:
        d.update(b)
    if d.hexdigest() != sha256_file(src):
        raise BenchError(f"coralfs read-back of {what} is NOT bit-exact (sha256 differs from {src})")


def verify_coralfs(res: CoralResult, versions: list[Version]) -> None:
    n = 0
    for cid, v in zip(res.commits, versions, strict=True):
        for rel, src in v.items():
            blocks, _ = read_coralfs(res.root, cid, rel)
            check_blocks(blocks, src, f"{cid.hex()[:12]}:{rel}")
            n += 1
    res.verified_files = n


# ---------------------------------------------------------------------------- per-file peers
def dtype_bytes(data: bytes) -> dict[str, int]:
    out: dict[str, int] = {}
    _, regions = split(memoryview(data))
    for r in regions:
        if r.kind == "tensor":
            out[r.dtype] = out.get(r.dtype, 0) + r.end - r.start
    return out


@dataclass
class PeerRun:
    sizes: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, set[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, peer: str, size: int, seconds: float) -> None:
        with self.lock:  # xdelta3 jobs add from background threads
            self.sizes[peer] = self.sizes.get(peer, 0) + size
            self.seconds[peer] = self.seconds.get(peer, 0.0) + seconds

    def note(self, peer: str, text: str) -> None:
        self.notes.setdefault(peer, set()).add(text)


def _timed(fn: Callable[..., int], *args: Any, **kw: Any) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = fn(*args, **kw)
    return n, time.perf_counter() - t0


def run_file_peers(versions: list[Version], enabled: Sequence[str], tmp: Path, run: PeerRun,
                   background: ThreadPoolExecutor, pending: list[Future[None]]) -> None:
    """zstd / ZipNN / ZipNN-delta / zstd-patch in this thread; xdelta3 (slow) on ``background``.

    The last version of each series is round-tripped through every delta peer (and ZipNN)."""
    tmp.mkdir(parents=True, exist_ok=True)
    job = 0
    for i, v in enumerate(versions):
        prev_v = versions[i - 1] if i else {}
        last = i == len(versions) - 1
        for rel, src in v.items():
            job += 1
            data = src.read_bytes()
            prev_src = prev_v.get(rel)
            if "zstd" in enabled:
                run.add("zstd", *_timed(peers.zstd3, data))
            zipnn_size = None
            dtype = peers.zipnn_dtype(dtype_bytes(data)) if ("zipnn" in enabled or "zipnn-delta" in enabled) else None
            if "zipnn" in enabled or "zipnn-delta" in enabled:
                if dtype is None:
                    zipnn_size, zs = _timed(peers.zstd3, data)
                    note = "files with no float tensors (json, vocab) are counted as zstd -3"
                else:
                    zipnn_size, zs = _timed(peers.zipnn_compress, data, dtype, verify=last)
                    note = ""
                if "zipnn" in enabled:
                    run.add("zipnn", zipnn_size, zs)
                    if note:
                        run.note("zipnn", note)
            if "zipnn-delta" in enabled:
                assert zipnn_size is not None
                prev_data = prev_src.read_bytes() if prev_src is not None else None
                same_len = prev_data is not None and len(prev_data) == len(data)
                if dtype is not None and same_len:
                    run.add("zipnn-delta", *_timed(peers.zipnn_compress, data, dtype, prev_data, verify=last))
                elif dtype is None and same_len:
                    assert prev_data is not None
                    run.add("zipnn-delta", *_timed(peers.xor_zstd3, data, prev_data))
                    run.note("zipnn-delta", "files with no float tensors: zstd -3 of the XOR with the previous "
                                            "version (zstd -3 alone when the size changed)")
                else:
                    run.add("zipnn-delta", zipnn_size, zs)
                    if dtype is not None and prev_data is not None:
                        run.note("zipnn-delta", "a file whose size changed is stored as plain ZipNN")
                    elif dtype is None and prev_data is not None:
                        run.note("zipnn-delta", "files with no float tensors: zstd -3 of the XOR with the previous "
                                                "version (zstd -3 alone when the size changed)")
                    # the first version of a series has no base: plain ZipNN, nothing to note
                del prev_data
            del data
            if "zstd-patch" in enabled:
                out = str(tmp / f"patch-{job}.zst")
                if prev_src is not None:
                    run.add("zstd-patch", *_timed(peers.zstd_patch, str(prev_src), str(src), out, verify=last))
                else:
                    run.add("zstd-patch", *_timed(peers.zstd_cli, str(src), out))
                peers._unlink(out)
            if "xdelta3" in enabled:
                pending.append(background.submit(_xdelta_job, run, prev_src, src, tmp / f"xd-{job}.vcdiff", last))


def _xdelta_job(run: PeerRun, prev: Path | None, cur: Path, out: Path, verify: bool) -> None:
    size, secs = _timed(peers.xdelta3, str(prev) if prev else None, str(cur), str(out), verify=verify)
    out.unlink(missing_ok=True)
    run.add("xdelta3", size, secs)


def run_repo_peers(versions: list[Version], enabled: Sequence[str], tmp: Path, run: PeerRun) -> None:
    names = [p for p in peers.REPO_PEERS if p in enabled]
    if not names:
        return
    work = tmp / "work"
    work.mkdir(parents=True, exist_ok=True)
    repos = [peers.make_repo_peer(n, tmp / n) for n in names]
    prev: set[str] = set()
    for i, v in enumerate(versions):
        place(v, work, prev)
        prev = set(v)
        for r in repos:
            t0 = time.perf_counter()
            r.backup(work, f"v{i:03d}")
            run.add(r.name, 0, time.perf_counter() - t0)
    for r in repos:
        run.add(r.name, r.size(), 0.0)


# ---------------------------------------------------------------------------- floor estimate
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def h0_bytes(u8: np.ndarray) -> float:
    """Order-0 entropy of a byte array, in bytes."""
    if u8.size == 0:
        return 0.0
    counts = np.bincount(u8, minlength=256)
    p = counts[counts > 0] / u8.size
    return float(-(p * np.log2(p)).sum() * u8.size / 8)


def planes_h0(arr: np.ndarray, width: int) -> float:
    u8 = arr.view(np.uint8).reshape(-1, width)
    return sum(h0_bytes(np.ascontiguousarray(u8[:, k])) for k in range(width))


@dataclass
class FloorRow:
    pair: str
    tensor_bytes: int
    h0_xor: float
    h0_plain: float
    h0_best: float
    coral: int


def floor_estimate(versions: list[Version], coral: CoralResult) -> list[FloorRow]:
    rows: list[FloorRow] = []
    for i in range(1, len(versions)):
        for rel, src in versions[i].items():
            prev_src = versions[i - 1].get(rel)
            if prev_src is None:
                continue
            a = prev_src.read_bytes()
            b = src.read_bytes()
            prev_regions = {r.name: r for r in split(memoryview(a))[1] if r.kind == "tensor"}
            tb = 0
            hx = hp = hb = 0.0
            for r in split(memoryview(b))[1]:
                if r.kind != "tensor" or r.width not in _UINT:
                    continue
                n = (r.end - r.start) // r.width
                cur = np.frombuffer(b, dtype=_UINT[r.width], count=n, offset=r.start)
                plain = planes_h0(cur, r.width)
                p = prev_regions.get(r.name)
                if p is not None and p.width == r.width and p.end - p.start == r.end - r.start:
                    old = np.frombuffer(a, dtype=_UINT[r.width], count=n, offset=p.start)
                    xor = planes_h0(cur ^ old, r.width)
                else:
                    xor = plain
                tb += n * r.width
                hx += xor
                hp += plain
                hb += min(xor, plain)
            rows.append(FloorRow(f"{i - 1:03d}->{i:03d}", tb, hx, hp, hb, coral.version_stored[i]))
    return rows


# ---------------------------------------------------------------------------- throughput
@dataclass
class Throughput:
    rows: list[dict[str, Any]] = field(default_factory=list)
    ingest_ratio: dict[str, float] = field(default_factory=dict)
    read_ratio: float | None = None


def same_block_fraction(a: Path, b: Path, block: int = 1 << 20) -> float:
    """Fraction of 1 MiB blocks at the same offset that are identical in ``a`` and ``b``."""
    same = total = 0
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while x := fa.read(block):
            total += 1
            same += x == fb.read(block)
    return same / total if total else 1.0


def warm(*paths: Path) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(READ_BLOCK):
                pass


def run_throughput(all_versions: dict[str, list[Version]], coral: dict[str, CoralResult], tmp: Path,
                   repeats: int) -> Throughput:
    tp = Throughput()
    zstd = shutil.which("zstd")
    # -- ingest: the largest file that really changed since its previous version (so the
    #    "next version" number measures delta encoding, not dedup of a frozen backbone)
    cands = []
    for s, vs in all_versions.items():
        for i, v in enumerate(vs):
            for rel, src in v.items():
                prev = vs[i - 1].get(rel) if i else None
                cands.append((src.stat().st_size, s, i, rel, src, prev))
    cands.sort(key=lambda c: c[0], reverse=True)
    pick = next((c for c in cands if c[5] is not None and same_block_fraction(c[4], c[5]) < 0.5), cands[0])
    size, series, idx, rel, src, prev = pick
    mb = size / MB
    label = f"{series}[{idx}] {src.name} ({mb:.1f} MB)"
    warm(src, *([prev] if prev else []))
    tmp.mkdir(parents=True, exist_ok=True)

    def ingest(with_prev: bool) -> tuple[float, float]:
        """(add + commit, add + commit + the background repack of the replaced version)."""
        root = tmp / "ingest"
        shutil.rmtree(root, ignore_errors=True)
        repo = Repository.init(root)
        try:
            if with_prev:
                assert prev is not None
                place({rel: prev}, root)
                repo.add([root / rel])
                repo.commit("previous")
                repo.wait_repack()
            place({rel: src}, root, [rel])
            t0 = time.perf_counter()
            repo.add([root / rel])
            cid = repo.commit("timed")
            dt = time.perf_counter() - t0
            repo.wait_repack()
            dt_all = time.perf_counter() - t0
        finally:
            repo.close()
        blocks, _ = read_coralfs(root, cid, rel)
        check_blocks(blocks, src, f"ingest test {rel}")
        shutil.rmtree(root, ignore_errors=True)
        return dt, dt_all

    log(f"throughput: ingest of {label}")
    out = tmp / "ingest.zst"

    def zc() -> float:
        assert zstd is not None
        t0 = time.perf_counter()
        subprocess.run([zstd, "-q", "-f", "-3", "-T2", str(src), "-o", str(out)], check=True)
        return time.perf_counter() - t0

    # interleaved, so a burst of load from other processes hits both sides alike
    times: dict[str, list[float]] = {"first": [], "next": [], "next_all": [], "zstd": []}
    for _ in range(repeats):
        times["first"].append(ingest(False)[0])
        if prev is not None:
            a, b = ingest(True)
            times["next"].append(a)
            times["next_all"].append(b)
        if zstd:
            times["zstd"].append(zc())
    out.unlink(missing_ok=True)
    t_first = min(times["first"])
    t_next = min(times["next"]) if times["next"] else None
    t_next_all = min(times["next_all"]) if times["next_all"] else None
    t_zstd = min(times["zstd"]) if times["zstd"] else None
    zstd_speed = mb / t_zstd if t_zstd else None
    tp.rows.append({"op": "zstd -3 -T2 (CLI, file -> file)", "file": label, "seconds": t_zstd,
                    "mbps": zstd_speed, "vs": None})
    for key, name, t in (("first", "coralfs add+commit, first version (no base)", t_first),
                         ("next", "coralfs add+commit, next version (returns; the replaced version is "
                                  "re-encoded in the background)", t_next),
                         ("next_all", "coralfs add+commit, next version, until that re-encoding is done",
                          t_next_all)):
        if t is None:
            continue
        speed = mb / t
        ratio = speed / zstd_speed if zstd_speed else None
        if ratio is not None:
            tp.ingest_ratio[key] = ratio
        tp.rows.append({"op": name, "file": label, "seconds": t, "mbps": speed, "vs": ratio})

    # -- read: newest version of the longest series
    longest = max(all_versions, key=lambda s: (len(all_versions[s]), sum(map(version_bytes, all_versions[s]))))
    vs = all_versions[longest]
    newest = vs[-1]
    rel = max(newest, key=lambda r: newest[r].stat().st_size)
    src = newest[rel]
    mb = src.stat().st_size / MB
    label = f"{longest}[{len(vs) - 1}] {src.name} ({mb:.1f} MB)"
    res = coral[longest]
    cid = res.commits[-1]
    warm(src)
    log(f"throughput: read of {label}")

    def read() -> float:
        blocks, dt = read_coralfs(res.root, cid, rel)
        check_blocks(blocks, src, f"newest {longest}:{rel}")
        return dt

    z = tmp / "read.zst"

    def zd() -> float:
        assert zstd is not None
        t0 = time.perf_counter()
        subprocess.run([zstd, "-q", "-d", "-c", str(z)], check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - t0

    read()  # the LMDB pages into the page cache, as the zstd file will be
    if zstd:
        subprocess.run([zstd, "-q", "-f", "-3", str(src), "-o", str(z)], check=True)
        warm(z)
    t_reads: list[float] = []
    t_zds: list[float] = []
    for _ in range(repeats):
        t_reads.append(read())
        if zstd:
            t_zds.append(zd())
    z.unlink(missing_ok=True)
    t_read = min(t_reads)
    t_zd = min(t_zds) if t_zds else None
    zd_speed = mb / t_zd if t_zd else None
    depth = max((v for v in _chain_depths(res.root, cid, rel)), default=0)
    tp.rows.append({"op": "zstd -d (CLI, .zst -> /dev/null)", "file": label, "seconds": t_zd, "mbps": zd_speed,
                    "vs": None})
    ratio = (mb / t_read) / zd_speed if zd_speed else None
    tp.read_ratio = ratio
    tp.rows.append({"op": f"coralfs read newest version (fresh Repository, 8 MiB blocks; max delta depth {depth})",
                    "file": label, "seconds": t_read, "mbps": mb / t_read, "vs": ratio})
    return tp


def _chain_depths(root: Path, cid: bytes, rel: str) -> list[int]:
    from coralfs.codec import records

    repo = Repository(root)
    try:
        man = repo.get_manifest(repo.entry(cid, rel).manifest)
        out = []
        with repo.store.read() as t:
            for c in man.chunk_ids():
                v = t.get("chunks", c)
                if v is not None:
                    out.append(records.parse_header(v).depth)
        return out
    finally:
        repo.close()


# ---------------------------------------------------------------------------- formatting
def fmt_size(n: float) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} kB"
    return f"{int(n)} B"


def fmt_cell(n: int | None, raw: int) -> str:
    if n is None:
        return "—"
    return f"{fmt_size(n)} ({raw / n:.2f}x)" if n else "0 B"


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> str:
    right = set(right)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)


PEER_LABELS = {"zstd": "zstd-3", "zipnn": "zipnn", "zipnn-delta": "zipnn-delta", "zstd-patch": "zstd-patch",
               "xdelta3": "xdelta3", "restic": "restic", "borg-lz4": "borg lz4", "borg-zstd3": "borg zstd,3"}


@dataclass
class SeriesResult:
    name: str
    versions: int
    files: int
    raw: int
    coral: CoralResult
    peers: PeerRun
    unavailable: dict[str, str]

    def best_peer(self) -> tuple[str, int] | None:
        if not self.peers.sizes:
            return None
        return min(self.peers.sizes.items(), key=lambda kv: kv[1])


def storage_table(results: list[SeriesResult], peer_names: Sequence[str]) -> str:
    header = ["series", "versions", "raw", "coralfs", "coralfs LMDB file", *[PEER_LABELS[p] for p in peer_names]]
    rows = []
    for r in results:
        cells = [r.name, str(r.versions), fmt_size(r.raw), fmt_cell(r.coral.stats["stored_bytes"], r.raw),
                 fmt_cell(r.coral.stats["lmdb_file_bytes"], r.raw)]
        for p in peer_names:
            if p in r.peers.sizes:
                cells.append(fmt_cell(r.peers.sizes[p], r.raw))
            else:
                cells.append(f"n/a ({r.unavailable.get(p, 'skipped')})")
        rows.append(cells)
    return md_table(header, rows, right=range(1, len(header)))


def best_peer_lines(results: list[SeriesResult]) -> list[str]:
    out = []
    for r in results:
        bp = r.best_peer()
        coral = r.coral.stats["stored_bytes"]
        if bp is None:
            out.append(f"- {r.name}: no peer ran")
            continue
        name, size = bp
        out.append(f"- {r.name}: coralfs {fmt_size(coral)} vs best peer {PEER_LABELS[name]} {fmt_size(size)}: "
                   f"coralfs vs best peer: {size / coral:.2f}x fewer bytes")
    return out


def codec_table(r: SeriesResult) -> str:
    st = r.coral.stats
    rows = []
    for codec, d in sorted(st["by_codec"].items(), key=lambda kv: -kv[1]["stored"]):
        rows.append([codec, str(d["chunks"]), fmt_size(d["raw"]), fmt_size(d["stored"]),
                     f"{d['raw'] / d['stored']:.2f}x" if d["stored"] else "—",
                     f"{100 * d['stored'] / st['stored_bytes']:.1f}%"])
    rows.append(["(objects: manifests, trees, commits)", "", "", fmt_size(st["object_bytes"]), "",
                 f"{100 * st['object_bytes'] / st['stored_bytes']:.1f}%"])
    return md_table(["codec", "chunks", "raw", "stored", "ratio", "share of stored"], rows, right=range(1, 6))


def floor_table(rows: list[FloorRow]) -> str:
    out = []
    for f in rows:
        out.append([f.pair, fmt_size(f.tensor_bytes), fmt_size(f.h0_xor), fmt_size(f.h0_plain), fmt_size(f.h0_best),
                    fmt_size(f.coral), f"{f.coral / f.h0_best:.3f}" if f.h0_best else "—"])
    tot = FloorRow("total", sum(f.tensor_bytes for f in rows), sum(f.h0_xor for f in rows),
                   sum(f.h0_plain for f in rows), sum(f.h0_best for f in rows), sum(f.coral for f in rows))
    out.append(["**total**", fmt_size(tot.tensor_bytes), fmt_size(tot.h0_xor), fmt_size(tot.h0_plain),
                fmt_size(tot.h0_best), fmt_size(tot.coral), f"{tot.coral / tot.h0_best:.3f}" if tot.h0_best else "—"])
    return md_table(["pair", "tensor bytes", "H0 XOR planes", "H0 plain planes", "H0 best per tensor",
                     "coralfs stored (whole version)", "coralfs / H0 best"], out, right=range(1, 7))


def throughput_table(tp: Throughput) -> str:
    rows = []
    for r in tp.rows:
        rows.append([r["op"], r["file"], f"{r['seconds']:.3f}" if r["seconds"] else "n/a",
                     f"{r['mbps']:.0f}" if r["mbps"] else "n/a", f"{r['vs']:.2f}x" if r["vs"] is not None else ""])
    return md_table(["operation", "file", "seconds (best)", "MB/s", "vs zstd"], rows, right=(2, 3, 4))


def targets(results: list[SeriesResult], tp: Throughput | None) -> str:
    by = {r.name: r for r in results}
    rows = []

    def pf(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    for s in ("finetune_fp32", "finetune_bf16"):
        r = by.get(s)
        bp = r.best_peer() if r else None
        if r is None or bp is None:
            rows.append([f"{s}: coralfs >= {TARGET_FINETUNE}x fewer bytes than the best peer", "not run", pf(None)])
            continue
        x = bp[1] / r.coral.stats["stored_bytes"]
        rows.append([f"{s}: coralfs >= {TARGET_FINETUNE}x fewer bytes than the best peer",
                     f"{x:.3f}x (best peer {PEER_LABELS[bp[0]]})", pf(x >= TARGET_FINETUNE)])
    r = by.get("scratch_pt")
    bp = r.best_peer() if r else None
    if r is None or bp is None:
        rows.append(["scratch_pt: coralfs bytes <= best peer bytes", "not run", pf(None)])
    else:
        c = r.coral.stats["stored_bytes"]
        rows.append(["scratch_pt: coralfs bytes <= best peer bytes",
                     f"{fmt_size(c)} vs {fmt_size(bp[1])} ({PEER_LABELS[bp[0]]}; {bp[1] / c:.3f}x)", pf(c <= bp[1])])
    if tp is None or not tp.ingest_ratio:
        rows.append([f"ingest >= {TARGET_SPEED}x zstd -3 -T2 speed", "not run", pf(None)])
    else:
        worst = min(tp.ingest_ratio.values())
        names = {"first": "first version", "next": "next version (commit returns)",
                 "next_all": "next version incl. its background re-encoding"}
        detail = ", ".join(f"{names.get(k, k)} {v:.2f}x" for k, v in tp.ingest_ratio.items())
        rows.append([f"ingest >= {TARGET_SPEED}x zstd -3 -T2 speed (first and next version, the latter also "
                     "counting the repack it causes)", detail,
                     pf(worst >= TARGET_SPEED)])
    if tp is None or tp.read_ratio is None:
        rows.append([f"newest-version read >= {TARGET_SPEED}x zstd -d speed", "not run", pf(None)])
    else:
        rows.append([f"newest-version read >= {TARGET_SPEED}x zstd -d speed", f"{tp.read_ratio:.2f}x",
                     pf(tp.read_ratio >= TARGET_SPEED)])
    return md_table(["target", "measured", "result"], rows)


def notes(results: list[SeriesResult], peer_names: Sequence[str]) -> list[str]:
    out = [
        "- ratio = raw / stored. coralfs = `repo.stats()['stored_bytes']` (chunk records + objects); the LMDB "
        "file column is the size of `data.mdb` on disk (page granularity and free pages included).",
        "- zstd-3 / zipnn / zipnn-delta / zstd-patch / xdelta3 store every version separately (per file); "
        "zipnn-delta, zstd-patch and xdelta3 encode a file against the same path in the previous version, "
        "and the first version on its own (ZipNN / `zstd -3` / `xdelta3 -e`).",
        "- zipnn: ZipNN byte mode with the file's dominant float dtype (float32 / bfloat16); zipnn-delta: "
        "ZipNN's own `delta_compressed_type='byte'` (XOR with the previous version, then byte grouping).",
        "- zstd-patch: `zstd -3 --long=W --patch-from=PREV` (W covers both files); xdelta3: "
        "`xdelta3 -e -B <source size> -s PREV`.",
        "- restic (repository format 2, default compression auto) and borg (`-e none`; lz4 = borg's default, "
        "and `--compression zstd,3`): one repository per series, one backup per version of the same "
        "directory; size = `du -sb` of the repository minus its size right after init.",
        "- the last version of every series is round-tripped through ZipNN, zipnn-delta, zstd-patch and "
        "xdelta3 to make sure the peers' sizes are for output that decodes.",
        "- throughput: ingest uses the largest file that changed in most of its 1 MiB blocks since its "
        "previous version (so partial_ft's frozen backbone, which mostly dedups, is not picked), timed as the "
        "first version in a fresh repository and as the next version after its predecessor; read uses the "
        "largest file of the newest version of the series with the most versions. Files are in the page "
        "cache for coralfs and zstd alike; each timed coralfs read is sha256-checked outside the timing.",
    ]
    extra: dict[str, set[str]] = {}
    for r in results:
        for p, ns in r.peers.notes.items():
            extra.setdefault(p, set()).update(ns)
    for p in peer_names:
        for n in sorted(extra.get(p, ())):
            out.append(f"- {PEER_LABELS[p]}: {n}")
    return out


# ---------------------------------------------------------------------------- main
def parse_list(s: str | None) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()] if s else []


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--small", action="store_true", help="the small corpus (quick smoke run)")
    ap.add_argument("--series", help=f"comma-separated subset of {','.join(SERIES)}")
    ap.add_argument("--skip-peers", default="", help=f"comma-separated peers to skip: {','.join(peers.ALL_PEERS)}, "
                                                     "borg (= both borg runs)")
    ap.add_argument("--skip-throughput", action="store_true", help="storage tables only")
    ap.add_argument("--out", type=Path, help="also write the tables (with command line and date) to this markdown file")
    ap.add_argument("--json", type=Path, help="also write all numbers as JSON")
    ap.add_argument("--corpus", type=Path, help="corpus directory (default bench/.cache/corpus, or "
                                                "bench/.cache/corpus-small with --small)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions (best is reported)")
    ap.add_argument("--xdelta-workers", type=int, default=2, help="xdelta3 processes run in the background")
    ap.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()), help="where the scratch dirs go")
    args = ap.parse_args(argv)

    series = parse_list(args.series) or list(SERIES)
    unknown = [s for s in series if s not in SERIES]
    if unknown:
        ap.error(f"unknown series {unknown}; known: {','.join(SERIES)}")
    skip: set[str] = set()
    for p in parse_list(args.skip_peers):
        if p in peers.PEER_ALIASES:
            skip.update(peers.PEER_ALIASES[p])
        elif p in peers.ALL_PEERS:
            skip.add(p)
        else:
            ap.error(f"unknown peer {p!r}; known: {','.join(peers.ALL_PEERS)}, borg")
    unavailable: dict[str, str] = {p: "skipped" for p in skip}
    for p in peers.ALL_PEERS:
        if p not in skip and (why := peers.available(p)):
            unavailable[p] = why
            log(f"peer {p}: {why}")
    enabled = [p for p in peers.ALL_PEERS if p not in unavailable]

    from bench.corpus import DEFAULT_OUT, ensure_corpus

    corpus_dir = args.corpus or (DEFAULT_OUT.parent / "corpus-small" if args.small else DEFAULT_OUT)
    log(f"corpus: {corpus_dir} ({'small' if args.small else 'full'})")
    paths = ensure_corpus(corpus_dir, small=args.small, only=series)
    all_versions = {s: to_versions(paths[s]) for s in series if s in paths}

    started = datetime.datetime.now(datetime.timezone.utc)
    tmp = Path(tempfile.mkdtemp(prefix="coralfs-bench-storage-", dir=args.tmp))
    results: list[SeriesResult] = []
    floor_rows: list[FloorRow] = []
    tp: Throughput | None = None
    try:
        # xdelta3 is by far the slowest peer (~1 MB/s on float data): it runs on background
        # workers across series; everything timed for the throughput table runs after it.
        background = ThreadPoolExecutor(max(1, args.xdelta_workers), thread_name_prefix="xdelta3")
        pending: list[Future[None]] = []
        try:
            for s, versions in all_versions.items():
                raw = sum(map(version_bytes, versions))
                nfiles = sum(len(v) for v in versions)
                log(f"{s}: {len(versions)} versions, {nfiles} files, {fmt_size(raw)}: coralfs")
                t0 = time.perf_counter()
                coral = run_coralfs(versions, tmp / s / "coralfs")
                log(f"{s}: coralfs ingest {time.perf_counter() - t0:.1f}s, stored {fmt_size(coral.stats['stored_bytes'])}"
                    f" ({raw / coral.stats['stored_bytes']:.2f}x); verifying every version")
                verify_coralfs(coral, versions)
                log(f"{s}: {coral.verified_files} files read back bit-exact; peers")
                run = PeerRun()
                run_file_peers(versions, enabled, tmp / s / "files", run, background, pending)
                run_repo_peers(versions, enabled, tmp / s / "repos", run)
                shutil.rmtree(tmp / s / "repos", ignore_errors=True)
                results.append(SeriesResult(s, len(versions), nfiles, raw, coral, run, unavailable))
                if s == "scratch_pt":
                    log("scratch_pt: entropy floor estimate")
                    floor_rows = floor_estimate(versions, coral)
            if pending:
                log(f"waiting for {sum(not f.done() for f in pending)} of {len(pending)} xdelta3 jobs")
            for f in pending:
                f.result()
        finally:
            background.shutdown(wait=True, cancel_futures=True)
        for r in results:
            bp = r.best_peer()
            if bp:
                log(f"{r.name}: best peer {bp[0]} {fmt_size(bp[1])}; coralfs "
                    f"{bp[1] / r.coral.stats['stored_bytes']:.2f}x fewer bytes")
        if not args.skip_throughput:
            tp = run_throughput(all_versions, {r.name: r.coral for r in results}, tmp / "throughput", args.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    peer_cols = list(peers.ALL_PEERS)
    parts = ["## Stored bytes (ratio = raw / stored)", "", storage_table(results, peer_cols), "",
             "Best peer per series:", "", *best_peer_lines(results), ""]
    parts += ["## coralfs by codec", ""]
    for r in results:
        st = r.coral.stats
        parts += [f"### {r.name}: {st['chunks']} chunks ({st['delta_chunks']} delta, {st['dedup_hits']} dedup hits); "
                  f"{r.coral.verified_files} files read back bit-exact", "", codec_table(r), ""]
    if floor_rows:
        parts += ["## scratch_pt: order-0 entropy of the residual byte planes vs coralfs", "",
                  "Per consecutive pair, over the tensor bytes of the newer checkpoint: H0 of each byte plane of "
                  "`new XOR old` (uint view), H0 of the planes of `new` alone, and the smaller of the two per "
                  "tensor. Order-0 is an estimate, not a strict bound (a context model can beat it); coralfs's "
                  "number is everything it wrote for that version (tensor and non-tensor chunks).", "",
                  floor_table(floor_rows), ""]
    if tp is not None:
        parts += [f"## Throughput (best of {args.repeats}; shared machine, compare ratios)", "",
                  throughput_table(tp), ""]
    parts += ["## Targets", "", targets(results, tp), "", "## Notes", "", *notes(results, peer_cols), ""]
    body = "\n".join(parts)
    print(body)

    if args.out:
        cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], os.getcwd()), *sys.argv[1:]])
        head = [f"# Storage benchmark ({'small' if args.small else 'full'} corpus)", "",
                f"- command: `{cmd}`",
                f"- date: {started.strftime('%Y-%m-%d %H:%M UTC')}",
                f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                f"- git: {_git_rev()}", ""]
        args.out.write_text("\n".join(head) + "\n" + body, encoding="utf-8")
        log(f"wrote {args.out}")
    if args.json:
        args.json.write_text(json.dumps(_as_json(results, floor_rows, tp, started), indent=2, default=str) + "\n",
                             encoding="utf-8")
        log(f"wrote {args.json}")
    return 0


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _as_json(results: list[SeriesResult], floor_rows: list[FloorRow], tp: Throughput | None,
             started: datetime.datetime) -> dict[str, Any]:
    return {
        "date": started.isoformat(),
        "series": {r.name: {
            "versions": r.versions, "files": r.files, "raw_bytes": r.raw,
            "coralfs": {k: r.coral.stats[k] for k in ("stored_bytes", "lmdb_file_bytes", "object_bytes", "chunks",
                                                      "delta_chunks", "dedup_hits", "by_codec")},
            "coralfs_ingest_seconds": r.coral.ingest_seconds,
            "coralfs_version_stored": r.coral.version_stored,
            "peers": r.peers.sizes, "peer_seconds": r.peers.seconds,
            "peer_notes": {k: sorted(v) for k, v in r.peers.notes.items()},
        } for r in results},
        "floor": [f.__dict__ for f in floor_rows],
        "throughput": None if tp is None else {"rows": tp.rows, "ingest_ratio": tp.ingest_ratio,
                                               "read_ratio": tp.read_ratio},
    }


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"storage benchmark FAILED: {e}", file=sys.stderr)
        sys.exit(2)
