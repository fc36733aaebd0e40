"""Issues 4 and 5 speed: reading and writing real checkpoints through the coralfs mount vs local disk.

Reading, side by side, in one run:

1. ``cat`` of a 100+ MB training checkpoint to /dev/null: first read (page cache dropped,
   fresh mount) and re-read (page cache warm).
2. ``torch.load`` of a full training checkpoint (model + AdamW state), first read.
3. ``safe_open().get_tensor`` of one tensor from a large safetensors file, first read.
4. The newest and the oldest checkpoint of a long series (the newest is stored as
   deltas): first read of each through the mount.

"First read" = ``echo 3 > /proc/sys/vm/drop_caches`` (needs root) before the read and,
for the mount, a fresh mount (so the decoded-chunk cache is empty too). Medians of
``--reps`` runs; for ``torch.load`` and ``get_tensor`` local and mount reads alternate.

Data: the real checkpoint series of ``bench/corpus.py`` (``scratch_pt``: a GPT trained from
scratch, model + AdamW every 10 steps; ``finetune_fp32``: MiniLM fine-tuned, safetensors).
None of those is over 100 MB, so the 100+ MB checkpoint is made here: a byte-level
transformer trained for a few AdamW steps on Python's standard library source, saved
with its optimizer state. Everything is cached under ``bench/.cache/mount-bench``.

Writing: writing is committing through the mount, against saving to local disk
(the repository's work tree, same filesystem) followed by ``repo.add`` + ``repo.commit``:

5. ``torch.save`` of the 100+ MB training checkpoint (model + AdamW state) as a new file.
6. ``torch.save`` of the next training step over it (stored as deltas against it).
7. ``cp`` of the checkpoint file into the branch directory.

Through the mount the time runs until the commit exists: the save (which returns once the
file is ingested and durable) plus ``fsync`` of the branch directory (which commits at
once instead of after the 1.5 s quiet period). Each run uses fresh repositories (and a
fresh mount); both sides first save and commit a warm-up checkpoint of the same size
(other bytes and tensor names), as a training job's process and mount are warm by its
second checkpoint (a cold process pays ~20% more for its first ingest: fresh memory).

Usage::

    python bench/mount.py [--reps 3] [--readahead-kb 8192] [--only read|write] [--json results.json]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from coralfs.mount.daemon import mount, umount  # noqa: E402
from coralfs.mount.options import READAHEAD_KB  # noqa: E402
from coralfs.mount.sessions import live_sessions  # noqa: E402
from coralfs.repository import Repository  # noqa: E402

CACHE = ROOT / "bench" / ".cache" / "mount-bench"
TARGETS = {  # the targets: mount vs local
    "reread": ("re-read throughput >= 80% of local", lambda r: r >= 0.8),
    "torch_load": ("torch.load first read <= 2x local", lambda r: r <= 2.0),
    "one_tensor": ("one tensor <= 2x local", lambda r: r <= 2.0),
    "series": ("newest vs oldest within 1.5x", lambda r: r <= 1.5),
    "write": ("mount <= 1.3x local save + commit", lambda r: r <= 1.3),
}


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench/mount {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ data
class _Block(nn.Module):
    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    """A small byte-level GPT: big enough that model + AdamW state is over 100 MB."""

    def __init__(self, d: int = 512, layers: int = 4, heads: int = 8, ff: int = 2048, ctx: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(_Block(d, heads, ff) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        x = self.tok(idx) + self.pos(torch.arange(t))
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln(x))


def _stdlib_bytes(n: int) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for p in sorted(root.glob("*.py")):
        out += p.read_bytes()
        if len(out) >= n:
            break
    return bytes(out[:n])



def _train_step(model: nn.Module, opt: torch.optim.Optimizer, data: torch.Tensor, g: torch.Generator) -> float:
    """One AdamW step of next-byte prediction on 8 random windows of ``data``; returns the loss."""
    starts = torch.randint(0, len(data) - 129, (8,), generator=g)
    batch = torch.stack([data[s:s + 129] for s in starts])
    loss = nn.functional.cross_entropy(model(batch[:, :-1]).reshape(-1, 256), batch[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()

def make_big_checkpoint(path: Path, steps: int = 3) -> Path:
    """Train ByteLM for a few AdamW steps on stdlib source; torch.save model + optimizer."""
    if path.exists():
        return path
    log(f"training a byte-level LM for {steps} steps (the 100+ MB checkpoint)")
    torch.manual_seed(0)
    data = torch.frombuffer(bytearray(_stdlib_bytes(1 << 20)), dtype=torch.uint8).long()
    model = ByteLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        loss = _train_step(model, opt, data, g)
        log(f"  step {step}: loss {loss:.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": steps}, tmp)
    tmp.replace(path)
    return path


def corpus_files() -> tuple[list[Path], list[Path]]:
    """(scratch_pt series, finetune_fp32 series) from bench/corpus.py (generated if missing)."""
    from bench.corpus import ensure_corpus

    c = ensure_corpus(only=["scratch_pt", "finetune_fp32"])
    return list(c["scratch_pt"]), list(c["finetune_fp32"])


def build_repo(series: list[Path], ft: list[Path], big: Path) -> tuple[str, dict[str, Any]]:
    """The benchmark repository (cached): the whole scratch series as commits of one path, the
    first and last fine-tune checkpoint, and the big checkpoint."""
    repo_dir = CACHE / "repo"
    sources = [*series, ft[0], ft[-1], big]
    key: list[Any] = [[str(p), p.stat().st_size, int(p.stat().st_mtime)] for p in sources]
    code = hashlib.sha256()  # a change to how data is stored rebuilds the repository
    for mod in ("ingest.py", "codec/records.py", "codec/tensor.py", "store/objects.py", "store/keys.py", "repack.py"):
        f = ROOT / "coralfs" / mod
        assert f.exists(), f"bench/mount.py's cache key names {f}, which is gone: update the list"
        code.update(f.read_bytes())
    key.append(code.hexdigest())
    meta_path = CACHE / "repo.json"
    if meta_path.exists() and (repo_dir / ".coralfs").exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            return str(repo_dir), meta
    if repo_dir.exists():
        shutil.rmtree(repo_dir)
    repo_dir.mkdir(parents=True)
    log(f"building the benchmark repository in {repo_dir}")
    t0 = time.perf_counter()
    r = Repository.init(repo_dir)
    try:
        series_commits = []
        prev = None  # each version committed over the previous one, as `coralfs add` does
        for p in series:
            prev, _ = r.ingest_file(p, "scratch/ckpt.pt", prev)
            series_commits.append(r.commit_changes("main", {"scratch/ckpt.pt": prev}, f"scratch {p.name}").hex())
        prev = None
        for p in (ft[0], ft[-1]):
            prev, _ = r.ingest_file(p, "ft/model.safetensors", prev)
            r.commit_changes("main", {"ft/model.safetensors": prev}, f"finetune {p.name}")
        e, _ = r.ingest_file(big, "big/train.pt")
        r.commit_changes("main", {"big/train.pt": e}, "big checkpoint")
        r.wait_repack()
        stats = r.stats()
    finally:
        r.close()
    meta = {"key": key, "series_commits": series_commits, "ingest_seconds": time.perf_counter() - t0,
            "logical_bytes": stats["logical_bytes"], "stored_bytes": stats["stored_bytes"]}
    meta_path.write_text(json.dumps(meta, indent=1))
    return str(repo_dir), meta


# ------------------------------------------------------------------ measuring
_can_drop: bool | None = None


def drop_caches() -> bool:
    global _can_drop
    if _can_drop is False:
        return False
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        _can_drop = True
    except OSError as e:
        if _can_drop is None:
            log(f"cannot drop the page cache ({e}): 'first read' numbers are warm")
        _can_drop = False
    return bool(_can_drop)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cat(path: str) -> None:
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)


class Mounter:
    def __init__(self, repo: str, mountpoint: str, readahead_kb: int) -> None:
        self.repo, self.mp, self.readahead_kb = repo, mountpoint, readahead_kb

    @contextlib.contextmanager
    def fresh(self) -> Iterator[str]:
        """A new mount (empty chunk cache), page cache dropped."""
        mount(self.repo, self.mp, readahead_kb=self.readahead_kb)
        try:
            drop_caches()
            yield self.mp
        finally:
            umount(self.mp)

    def cold(self, fn: Callable[[str], object], reps: int) -> float:
        times = []
        for _ in range(reps):
            with self.fresh() as mp:
                times.append(timed(lambda mp=mp: fn(mp)))
        return statistics.median(times)


def local_cold(fn: Callable[[], object], reps: int) -> float:
    times = []
    for _ in range(reps):
        drop_caches()
        times.append(timed(fn))
    return statistics.median(times)


def side_by_side(m: Mounter, local: Callable[[], object], mounted: Callable[[str], object],
                 reps: int) -> tuple[float, float]:
    """First reads, local and through a fresh mount alternating (which goes first alternates
    too), so both see the same machine: the disk of the benchmark machine drifts by +-30% over minutes.
    Returns the two medians."""
    lt: list[float] = []
    mt: list[float] = []
    for i in range(reps):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):
            if side == 0:
                drop_caches()
                lt.append(timed(local))
            else:
                with m.fresh() as d:
                    mt.append(timed(lambda d=d: mounted(d)))
    return statistics.median(lt), statistics.median(mt)


_API_SCRIPT = """
import io, sys, time
import torch
from coralfs.repository import Repository
repo, op, rev, path = sys.argv[1:5]
r = Repository(repo)
t = time.perf_counter()
with r.open(rev, path) as f:
    if op == "cat":
        while f.read(1 << 20):
            pass
    else:
        torch.load(io.BufferedReader(f, 1 << 20), weights_only=True)
print(time.perf_counter() - t)
"""


class Api:
    """The same first reads through the Python API (no FUSE), each in a fresh process with the
    page cache dropped: what decoding costs without the mount."""

    def __init__(self, repo: str) -> None:
        self.repo = repo

    def cold(self, op: str, rev: str, path: str, reps: int) -> float:
        times = []
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        for _ in range(reps):
            drop_caches()
            out = subprocess.run([sys.executable, "-c", _API_SCRIPT, self.repo, op, rev, path], env=env,
                                 capture_output=True, text=True, check=True).stdout
            times.append(float(out.split()[-1]))
        return statistics.median(times)


def pick_tensor(path: Path) -> tuple[str, int]:
    """A mid-file tensor of a few MB: a typical 'load one weight' request."""
    with safe_open(str(path), "pt") as f:
        sizes = []
        for k in f.keys():
            s = f.get_slice(k)
            n = 1
            for d in s.get_shape():
                n *= d
            sizes.append((n * 4, k))
    big = sorted(x for x in sizes if x[0] >= 1 << 20) or sorted(sizes)
    n, name = big[len(big) // 2]
    return name, n


def get_tensor(path: str, name: str) -> torch.Tensor:
    with safe_open(path, "pt") as f:
        return f.get_tensor(name)


def run(args: argparse.Namespace) -> dict[str, Any]:
    series, ft = corpus_files()
    big = make_big_checkpoint(CACHE / "big_train.pt")
    repo, meta = build_repo(series, ft, big)
    reps = args.reps
    mp = tempfile.mkdtemp(prefix="coral-bench-")
    m = Mounter(repo, mp, args.readahead_kb)
    api = Api(repo)
    res: dict[str, Any] = {"reps": reps, "readahead_kb": args.readahead_kb, "repo": meta,
                           "cpus": os.cpu_count(), "load_before": os.getloadavg()[0]}
    try:
        # 1. sequential read of the 100+ MB checkpoint
        size = big.stat().st_size
        log(f"cat {big.name} ({size / 1e6:.0f} MB)")
        lf = local_cold(lambda: cat(str(big)), reps)
        mfs, lrs, mrs = [], [], []
        for _ in range(reps):
            with m.fresh() as d:
                p = f"{d}/main/big/train.pt"
                mfs.append(timed(lambda p=p: cat(p)))
                cat(str(big))
                for _ in range(5):  # interleaved, so both see the same machine load
                    lrs.append(timed(lambda: cat(str(big))))
                    mrs.append(timed(lambda p=p: cat(p)))
        res["seq"] = {"bytes": size, "local_first": lf, "local_reread": statistics.median(lrs),
                      "mount_first": statistics.median(mfs), "mount_reread": statistics.median(mrs),
                      "api_first": api.cold("cat", "main", "big/train.pt", reps)}

        # 2. torch.load of a full training checkpoint (model + AdamW)
        newest = series[-1]
        log(f"torch.load {newest.name} ({newest.stat().st_size / 1e6:.0f} MB)")

        def tload(p: str) -> None:
            torch.load(p, weights_only=True)

        tl_local, tl_mount = side_by_side(m, lambda: tload(str(newest)),
                                          lambda d: tload(f"{d}/main/scratch/ckpt.pt"), reps)
        res["torch_load"] = {"bytes": newest.stat().st_size, "local": tl_local, "mount": tl_mount,
                             "api": api.cold("torch_load", "main", "scratch/ckpt.pt", reps)}

        # 3. one tensor from a large safetensors file
        stf = ft[-1]
        name, nbytes = pick_tensor(stf)
        log(f"get_tensor {name!r} ({nbytes / 1e6:.1f} MB) from {stf.name} ({stf.stat().st_size / 1e6:.0f} MB)")
        gt_local, gt_mount = side_by_side(m, lambda: get_tensor(str(stf), name),
                                          lambda d: get_tensor(f"{d}/main/ft/model.safetensors", name), reps)
        res["one_tensor"] = {"file_bytes": stf.stat().st_size, "tensor": name, "tensor_bytes": nbytes,
                             "local": gt_local, "mount": gt_mount}

        # 4. newest vs oldest of the series (first read through the mount; local for reference)
        oldest_id = meta["series_commits"][0]
        log(f"series of {len(series)}: oldest vs newest")
        res["series"] = {
            "n": len(series), "bytes": newest.stat().st_size,
            "oldest": m.cold(lambda d: cat(f"{d}/@commits/{oldest_id}/scratch/ckpt.pt"), reps),
            "newest": m.cold(lambda d: cat(f"{d}/main/scratch/ckpt.pt"), reps),
            "oldest_torch_load": m.cold(lambda d: tload(f"{d}/@commits/{oldest_id}/scratch/ckpt.pt"), reps),
            "newest_torch_load": m.cold(lambda d: tload(f"{d}/main/scratch/ckpt.pt"), reps),
            "local_oldest": local_cold(lambda: cat(str(series[0])), reps),
            "local_newest": local_cold(lambda: cat(str(newest)), reps),
            "api_oldest": api.cold("cat", oldest_id, "scratch/ckpt.pt", reps),
            "api_newest": api.cold("cat", "main", "scratch/ckpt.pt", reps),
        }
        res["load_after"] = os.getloadavg()[0]
    finally:
        with contextlib.suppress(Exception):
            umount(mp)
        with contextlib.suppress(OSError):
            os.rmdir(mp)
    res["page_cache_dropped"] = bool(_can_drop)
    return res


# ------------------------------------------------------------------ writing
def next_step(ckpt: dict[str, Any]) -> dict[str, Any]:
    """One more AdamW step from a ``make_big_checkpoint`` checkpoint: the next one a training
    loop would save (most tensors change a little: the delta case)."""
    model = ByteLM()
    model.load_state_dict(ckpt["model"])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    opt.load_state_dict(ckpt["optimizer"])
    data = torch.frombuffer(bytearray(_stdlib_bytes(1 << 20)), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(ckpt["step"])
    _train_step(model, opt, data, g)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": ckpt["step"] + 1}


def _fresh_repo(path: Path, files: dict[str, Callable[[Path], object]] | None = None) -> Repository:
    """A new repository whose main has one commit (a small file, plus ``files`` written by callables)."""
    if path.exists():
        deadline = time.monotonic() + 30
        while live_sessions(str(path)) and time.monotonic() < deadline:  # the last mount's daemon is exiting
            time.sleep(0.02)
        shutil.rmtree(path)
    r = Repository.init(path)
    (path / "README.txt").write_text("benchmark\n")
    for name, make in (files or {}).items():
        make(path / name)
    r.add([str(path / "README.txt"), *(str(path / n) for n in files or {})])
    r.commit("setup")
    return r


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_write(args: argparse.Namespace, big: Path) -> dict[str, Any]:
    reps = args.reps
    log("writing: loading the checkpoint and training one more step")
    ckpt0 = torch.load(big, weights_only=True)
    ckpt1 = next_step(ckpt0)
    work = Path(tempfile.mkdtemp(prefix="write-", dir=CACHE))
    mp = tempfile.mkdtemp(prefix="coral-bench-w-")
    cases: dict[str, Callable[[Path], object]] = {  # name -> write the file at a path
        "save_first": lambda p: torch.save(ckpt0, p),
        "save_next": lambda p: torch.save(ckpt1, p),
        "cp": lambda p: subprocess.run(["cp", str(big), str(p)], check=True),
    }
    # a checkpoint of the same size and kind with other bytes and tensor names (so it is no delta base)
    warm = {f"warmup.{k}": v + 1 for k, v in ckpt1["model"].items()}
    warm.update({f"warmup.opt.{i}.{k}": v + 1 for i, st in ckpt1["optimizer"]["state"].items()
                 for k, v in st.items() if isinstance(v, torch.Tensor) and v.numel() > 1})

    def warm_up(d: Path) -> None:
        """A save + commit before the timed one: a training job's mount (and process) is warm."""
        torch.save(warm, d / "warmup.pt")

    setup: dict[str, dict[str, Callable[[Path], object]]] = {  # what the repository holds before
        "save_first": {}, "save_next": {"train.pt": cases["save_first"]}, "cp": {}}
    target = {"save_first": "train.pt", "save_next": "train.pt", "cp": "ckpt.pt"}
    res: dict[str, Any] = {"bytes": big.stat().st_size, "cases": {}}
    try:
        for name, write in cases.items():
            log(f"write case {name}")
            local, local_save, mount_total, mount_save, mount_ingest = [], [], [], [], []
            stats: dict[str, int] = {}
            for i in range(reps):
                for side in (("local", "mount") if i % 2 == 0 else ("mount", "local")):  # alternate the order
                    if side == "local":  # local disk: save into the work tree, then add + commit (API)
                        r = _fresh_repo(work / "local", setup[name])
                        dest = work / "local" / target[name]
                        warm_up(work / "local")
                        r.add([str(work / "local/warmup.pt")])
                        r.commit("warm-up")
                        os.sync()
                        t0 = time.perf_counter()
                        write(dest)
                        t1 = time.perf_counter()
                        st = r.add([str(dest)])
                        r.commit("local")
                        local.append(time.perf_counter() - t0)
                        local_save.append(t1 - t0)
                        stats = {"stored": st.stored, "new_chunks": st.new_chunks, "delta_chunks": st.delta_chunks,
                                 "dedup_chunks": st.dedup_chunks}
                        r.close()
                        continue
                    # through the mount: the save returns once stored; fsync of the directory commits
                    r = _fresh_repo(work / "mounted", setup[name])
                    head = r.branch_head("main")
                    r.close()
                    mount(str(work / "mounted"), mp, readahead_kb=args.readahead_kb)
                    try:
                        warm_up(Path(mp) / "main")
                        _fsync_dir(f"{mp}/main")
                        with Repository(work / "mounted") as r:
                            head = r.branch_head("main")
                        time.sleep(0.3)  # (the mount deletes the warm-up's staged copy in the background)
                        os.sync()
                        t0 = time.perf_counter()
                        write(Path(mp) / "main" / target[name])
                        t1 = time.perf_counter()
                        _fsync_dir(f"{mp}/main")
                        t2 = time.perf_counter()
                    finally:
                        umount(mp)
                    with Repository(work / "mounted") as r:
                        c = r.branch_head("main")
                        assert c != head and r.get_commit(c).parents == (head,), "the mount did not commit"
                    stored = re.findall(r"stored main/\S+: \d+ bytes in ([\d.]+) s",
                                        (work / "mounted/.coralfs/mount.log").read_text())
                    mount_ingest.append(float(stored[-1]) if stored else float("nan"))
                    mount_save.append(t1 - t0)
                    mount_total.append(t2 - t0)
            res["cases"][name] = {"local": statistics.median(local), "mount": statistics.median(mount_total),
                                  "mount_save": statistics.median(mount_save), "ingest": stats,
                                  "local_save": statistics.median(local_save),
                                  "mount_ingest": statistics.median(mount_ingest),
                                  "runs": {"local": local, "mount": mount_total, "local_save": local_save,
                                           "mount_save": mount_save, "mount_ingest": mount_ingest}}
    finally:
        with contextlib.suppress(Exception):
            umount(mp)
        with contextlib.suppress(OSError):
            os.rmdir(mp)
        shutil.rmtree(work, ignore_errors=True)
    return res


def write_table(res: dict[str, Any]) -> str:
    ms = lambda t: f"{t * 1e3:,.0f} ms"  # noqa: E731
    size = res["bytes"]
    labels = {"save_first": f"torch.save {size / 1e6:.0f} MB training ckpt (new file)",
              "save_next": "torch.save of the next step over it (deltas)",
              "cp": f"cp of the {size / 1e6:.0f} MB ckpt file"}
    rows = [("case", "local save + add + commit", "mount: save returns", "mount: committed", "mount vs local",
             "target", "")]
    for name, c in res["cases"].items():
        r = c["mount"] / c["local"]
        rows.append((labels[name], ms(c["local"]), ms(c["mount_save"]), ms(c["mount"]), f"{r:.2f}x",
                     TARGETS["write"][0], "PASS" if TARGETS["write"][1](r) else "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    st = {k: c["ingest"] for k, c in res["cases"].items()}
    lines += ["", "where the time goes (medians): " + "; ".join(
        f"{k}: local save {ms(c['local_save'])} + add/commit {ms(c['local'] - c['local_save'])}, mount transfer "
        f"{ms(c['mount_save'] - c['mount_ingest'])} + ingest at close {ms(c['mount_ingest'])} + commit "
        f"{ms(c['mount'] - c['mount_save'])}" for k, c in res["cases"].items())]
    lines += ["", f"medians of {res['reps']} runs (local and mount alternating), fresh repositories each; "
              "'mount: committed' = the save plus "
              "fsync of the branch directory (without it the commit follows after the 1.5 s quiet period)",
              "stored by one ingest: " + "; ".join(f"{k} {v['stored'] / 1e6:,.1f} MB ({v['delta_chunks']} delta "
                                                     f"chunks)" for k, v in st.items())]
    return "\n".join(lines)


def mbps(n: int, t: float) -> str:
    return f"{n / t / 1e6:,.0f} MB/s"


def table(res: dict[str, Any]) -> str:
    ms = lambda t: f"{t * 1e3:,.0f} ms"  # noqa: E731
    ok = lambda key, r: "PASS" if TARGETS[key][1](r) else "FAIL"  # noqa: E731
    rows = [("case", "local disk", "mount", "mount vs local", "target", "", "API, no FUSE")]
    s = res["seq"]
    r = s["local_first"] / s["mount_first"]
    rows.append((f"cat {s['bytes'] / 1e6:.0f} MB ckpt, first read",
                 f"{ms(s['local_first'])} ({mbps(s['bytes'], s['local_first'])})",
                 f"{ms(s['mount_first'])} ({mbps(s['bytes'], s['mount_first'])})", f"{r:.0%} of local speed",
                 "(none)", "", ms(s["api_first"])))
    r = s["local_reread"] / s["mount_reread"]
    rows.append(("cat, re-read (page cache)", f"{ms(s['local_reread'])} ({mbps(s['bytes'], s['local_reread'])})",
                 f"{ms(s['mount_reread'])} ({mbps(s['bytes'], s['mount_reread'])})", f"{r:.0%} of local speed",
                 TARGETS["reread"][0], ok("reread", r), "-"))
    t = res["torch_load"]
    r = t["mount"] / t["local"]
    rows.append((f"torch.load {t['bytes'] / 1e6:.0f} MB training ckpt, first", ms(t["local"]), ms(t["mount"]),
                 f"{r:.2f}x local time", TARGETS["torch_load"][0], ok("torch_load", r), ms(t["api"])))
    o = res["one_tensor"]
    r = o["mount"] / o["local"]
    rows.append((f"get_tensor {o['tensor_bytes'] / 1e6:.1f} MB of a {o['file_bytes'] / 1e6:.0f} MB file, first",
                 ms(o["local"]), ms(o["mount"]), f"{r:.2f}x local time", TARGETS["one_tensor"][0],
                 ok("one_tensor", r), "-"))
    se = res["series"]
    for what, a, b, la, lb in (("cat", "oldest", "newest", "local_oldest", "local_newest"),
                               ("torch.load", "oldest_torch_load", "newest_torch_load", None, None)):
        r = max(se[a], se[b]) / min(se[a], se[b])
        rows.append((f"series of {se['n']}: {what} oldest / newest, first",
                     f"{ms(se[la])} / {ms(se[lb])}" if la and lb else "-", f"{ms(se[a])} / {ms(se[b])}",
                     f"{r:.2f}x apart", TARGETS["series"][0], ok("series", r),
                     f"{ms(se['api_oldest'])} / {ms(se['api_newest'])}" if what == "cat" else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    notes = [f"medians of {res['reps']} runs; first read = page cache dropped"
             + ("" if res["page_cache_dropped"] else " (NOT possible here: numbers are warm)")
             + " and, for the mount, a fresh mount (empty decoded-chunk cache); torch.load and get_tensor: "
             "local and mount alternating",
             f"kernel readahead on the mount: {res['readahead_kb']} KiB, on the repository's disk: "
             f"{res.get('disk_readahead_kb')} KiB; machine: {res['cpus']} CPUs, load average "
             f"{res['load_before']:.1f} before / {res['load_after']:.1f} after",
             f"repository: {res['repo']['logical_bytes'] / 1e6:,.0f} MB logical stored in "
             f"{res['repo']['stored_bytes'] / 1e6:,.0f} MB",
             "API, no FUSE = the same first read through Repository.open() in a fresh process (page cache "
             "dropped): the cost of decoding without the mount"]
    return "\n".join(lines + [""] + notes)


def disk_readahead_path(path: Path) -> Path | None:
    """``read_ahead_kb`` of the block device holding ``path`` (its disk, for a partition)."""
    st = os.stat(path)
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    if not dev.exists():
        return None
    dev = dev.resolve()
    if (dev / "partition").exists():
        dev = dev.parent
    ra = dev / "queue" / "read_ahead_kb"
    return ra if ra.exists() else None


@contextlib.contextmanager
def disk_readahead(kb: int | None) -> Iterator[int | None]:
    """Set the repository disk's readahead for the run (root only), restoring it after.
    Yields the setting in force. Kernel read-around on a page fault in LMDB's map reads this
    much around the fault, so it decides how many bytes a cold read pulls from disk."""
    ra = disk_readahead_path(CACHE)
    old = int(ra.read_text()) if ra is not None else None
    if kb is None or ra is None:
        yield old
        return
    ra.write_text(str(kb))
    try:
        yield kb
    finally:
        ra.write_text(str(old))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="runs per measurement (median)")
    p.add_argument("--readahead-kb", type=int, default=READAHEAD_KB, help="kernel readahead for the mount")
    p.add_argument("--json", metavar="PATH", help="also write the raw results here")
    p.add_argument("--prepare", action="store_true", help="only build the data and the repository")
    p.add_argument("--only", choices=("read", "write"), help="only the read or the write cases")
    p.add_argument("--disk-readahead-kb", type=int, metavar="KB",
                   help="set the repository disk's read_ahead_kb for this run, restored after (root; a what-if: "
                        "the default is to leave the machine as it is)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    if args.prepare:
        series, ft = corpus_files()
        build_repo(series, ft, make_big_checkpoint(CACHE / "big_train.pt"))
        return 0
    out: dict[str, Any] = {}
    if args.only != "write":
        with disk_readahead(args.disk_readahead_kb) as disk_ra:
            out["read"] = run(args)
        out["read"]["disk_readahead_kb"] = disk_ra
        print(table(out["read"]))
    if args.only != "read":
        out["write"] = run_write(args, make_big_checkpoint(CACHE / "big_train.pt"))
        out["write"]["reps"] = args.reps
        print(("\n" if "read" in out else "") + write_table(out["write"]))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
