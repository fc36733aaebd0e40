"""What does checkpointing with coralfs cost a training loop?

A short real training run (an MLP on a synthetic, learnable classification task, AdamW,
CPU) is timed end to end, wall clock, in several variants:

* ``none``          no checkpoints (the baseline);
* ``torch.save``    ``torch.save`` of the same state to a local file every N steps (what
                    people do without coralfs: a new file per checkpoint), left in the page
                    cache; ``torch.save+fsync`` also fsyncs it (coralfs commits are durable);
* ``manager``       ``CheckpointManager`` saving every N steps (serialise + ingest +
                    commit, in the loop);
* ``manager+keep``  the same with ``keep_last_n=2`` (a prune rewrites the branch after
                    every save) and ``gc_every_n_prunes=4``;
* ``manager async`` ``async_save=True``: the loop only snapshots tensors; serialise,
                    ingest and commit run on a background thread.

Printed: a markdown table with wall time, overhead vs the baseline (seconds and %),
time per save spent in the loop, and bytes on disk. Variants run round-robin ``--repeats``
times and the best wall time of each counts (the machine may be shared); the spread of
the baseline's runs is printed as the noise floor. Usage::

    python bench/trainer_overhead.py [--steps 240] [--every 20] [--hidden 1024] [--threads 1] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from coralfs.training import CheckpointManager  # noqa: E402


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(256, hidden), nn.LayerNorm(hidden), nn.GELU(),
                         nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, 10))


def dir_bytes(path: str) -> int:
    total = 0
    for dp, _, files in os.walk(path):
        for f in files:
            total += os.stat(os.path.join(dp, f)).st_blocks * 512
    return total


def run(variant: str, steps: int, every: int, hidden: int, workdir: str) -> dict:
    torch.manual_seed(0)
    model = make_model(hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    proj = torch.randn(256, 10, generator=torch.Generator().manual_seed(1))
    out = os.path.join(workdir, variant.replace(" ", "_").replace("+", "_").replace(".", "_"))
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    ckpt = None
    if variant.startswith("manager"):
        kw: dict = {"branch": "bench", "save_every_n_steps": every}
        if "keep" in variant:
            kw.update(keep_last_n=2, gc_every_n_prunes=4)
        if "async" in variant:
            kw["async_save"] = True
        ckpt = CheckpointManager(os.path.join(out, "repo"), **kw)
    saves = 0
    save_time = 0.0
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x = torch.randn(256, 256)
        y = (x @ proj).argmax(1)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % every == 0 and variant != "none":
            s0 = time.perf_counter()
            if variant.startswith("torch.save"):
                with open(os.path.join(out, f"ckpt_{step:06d}.pt"), "wb") as f:
                    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "step": step}, f)
                    if variant.endswith("fsync"):
                        f.flush()
                        os.fsync(f.fileno())
            else:
                assert ckpt is not None
                ckpt.step(step, model=model, optimizer=opt, scheduler=sched, metrics={"loss": loss.item()})
            save_time += time.perf_counter() - s0
            saves += 1
    if ckpt is not None:
        s0 = time.perf_counter()
        ckpt.close()  # waits for a background save
        save_time += time.perf_counter() - s0
    wall = time.perf_counter() - t0
    return {"variant": variant, "wall": wall, "saves": saves, "in_loop": save_time,
            "disk": dir_bytes(out), "final_loss": float(loss.detach())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = sum(p.numel() for p in make_model(args.hidden).parameters())
    workdir = args.workdir or tempfile.mkdtemp(prefix="coralfs-trainer-bench-")
    print(f"MLP with {params / 1e6:.2f}M parameters (checkpoint ~{params * 12 / 1e6:.0f} MB with AdamW state), "
          f"{args.steps} steps, a checkpoint every {args.every} steps, {args.threads} thread(s)\n")
    variants = ["none", "torch.save", "torch.save+fsync", "manager", "manager+keep", "manager async"]
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    try:
        for _ in range(args.repeats):
            for v in variants:
                r = run(v, args.steps, args.every, args.hidden, workdir)
                runs[v].append(r)
                print(f"  {v:<16} {r['wall']:7.2f}s", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    base_runs = [r["wall"] for r in runs["none"]]
    base = min(base_runs)
    print("| variant | wall (s) | overhead (s) | overhead | per save in loop (ms) | saves | on disk (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for v in variants:
        r = min(runs[v], key=lambda x: x["wall"])
        over = r["wall"] - base
        per = 1000 * min(x["in_loop"] for x in runs[v]) / r["saves"] if r["saves"] else 0.0
        print(f"| {v} | {r['wall']:.2f} | {over:+.2f} | {100 * over / base:+.1f}% | "
              f"{per:.0f} | {r['saves']} | {r['disk'] / 1e6:.1f} |")
    print(f"\nnoise floor: the baseline's runs spread over {max(base_runs) - min(base_runs):.2f}s "
          f"({len(base_runs)} runs)")

if __name__ == "__main__":
    main()
