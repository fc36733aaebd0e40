"""Train a small CNN on synthetic MNIST-like digits and version it with coralfs (CPU, ~1 minute).

    python examples/train_mnist_like.py                  # repository ./runs_repo, branch exp/cnn-lr3e-3
    python examples/train_mnist_like.py --steps 300      # quicker
    coralfs -R runs_repo log exp/cnn-lr3e-3              # the checkpoints are commits

What it shows:

* ``CheckpointManager`` saving every 100 steps and whenever validation accuracy improves,
  keeping the best 3 and the last 2 checkpoints (older ones are pruned from the branch);
* an interruption half-way: a fresh process state (new model, optimizer, scheduler, other
  RNG seeds) resumes from the last checkpoint with ``resume()`` and carries on exactly;
* ``load_best()`` restoring the best checkpoint into a new model, which is evaluated;
* ``coralfs gc`` (``coralfs.gc.gc``) reclaiming the space of the pruned checkpoints.

The data: 10 classes, each a fixed random pattern of strokes on a 16x16 canvas; every
sample is its class pattern shifted by up to 2 pixels, with random contrast, dropped
pixels and Gaussian noise. Learnable (a CNN reaches ~95%+), not trivially separable.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from coralfs.gc import gc, lmdb_info  # noqa: E402
from coralfs.training import CheckpointManager  # noqa: E402

SIZE = 16
CLASSES = 10


def class_templates(seed: int = 0) -> torch.Tensor:
    """One stroke pattern per class: a few random line segments, drawn on a canvas."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(CLASSES, SIZE, SIZE)
    for c in range(CLASSES):
        for _ in range(3):
            x0, y0, x1, y1 = (torch.randint(3, SIZE - 3, (4,), generator=g)).tolist()
            for t in torch.linspace(0, 1, 24):
                x = round(x0 + (x1 - x0) * float(t))
                y = round(y0 + (y1 - y0) * float(t))
                out[c, y, x] = 1.0
    return out


TEMPLATES = class_templates()
SHIFTS = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
SHIFTED = torch.stack([torch.stack([torch.roll(t, s, dims=(0, 1)) for s in SHIFTS]) for t in TEMPLATES])


def make_batch(n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    x = SHIFTED[y, torch.randint(0, len(SHIFTS), (n,), generator=generator)]  # small random translations
    x = x * (0.5 + torch.rand(n, 1, 1, generator=generator))
    x = x * (torch.rand(x.shape, generator=generator) > 0.15)
    x = x + 0.35 * torch.randn(x.shape, generator=generator)
    return x.unsqueeze(1), y


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 128), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(128, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build(seed: int, total_steps: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=total_steps)
    return model, opt, sched


@torch.no_grad()
def accuracy(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    x, y = data
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def train(ckpt: CheckpointManager, model: nn.Module, opt: torch.optim.Optimizer,
          sched: torch.optim.lr_scheduler.LRScheduler, start: int, stop: int, val: tuple, eval_every: int,
          final: int) -> None:
    t0 = time.perf_counter()
    for step in range(start + 1, stop + 1):
        x, y = make_batch(128)  # the global torch RNG: restored exactly by resume()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        metrics = {"loss": loss.item()}
        if step % eval_every == 0:
            metrics["val_acc"] = accuracy(model, val)
            print(f"  step {step:5d}  loss {metrics['loss']:.4f}  val_acc {metrics['val_acc']:.4f}  "
                  f"({time.perf_counter() - t0:.1f}s)")
        # force: the end of training is always saved, whatever the policy says
        ckpt.step(step, model=model, optimizer=opt, scheduler=sched, metrics=metrics, force=step == final)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", default="runs_repo")
    ap.add_argument("--branch", default="exp/cnn-lr3e-3")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--keep", action="store_true", help="keep an existing repository (default: start fresh)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # small kernels: one thread is fastest, and robust on a busy machine
    if not args.keep and os.path.exists(args.repo):
        shutil.rmtree(args.repo)
    val = make_batch(1000, torch.Generator().manual_seed(1))
    test = make_batch(2000, torch.Generator().manual_seed(2))
    eval_every = max(1, args.steps // 20)
    policy = dict(branch=args.branch, save_every_n_steps=max(1, args.steps // 10), save_on_best_metric="val_acc",
                  mode="max", keep_best_n=3, keep_last_n=2)

    t0 = time.perf_counter()
    half = args.steps // 2
    print(f"training {args.steps} steps; interrupting after {half}")
    model, opt, sched = build(0, args.steps)
    with CheckpointManager(args.repo, **policy) as ckpt:
        train(ckpt, model, opt, sched, 0, half, val, eval_every, args.steps)

    print("-- a new process: fresh objects and seeds; resume from the last checkpoint")
    model, opt, sched = build(1234, args.steps)
    with CheckpointManager(args.repo, **policy) as ckpt:
        start = ckpt.resume(model, opt, sched)
        print(f"  resumed at step {start}")
        train(ckpt, model, opt, sched, start, args.steps, val, eval_every, args.steps)
        print(f"trained in {time.perf_counter() - t0:.1f}s; {ckpt.saves} saves, {ckpt.prunes} prunes")

        print("\ncheckpoints kept on", args.branch)
        for info in ckpt.checkpoints():
            print(f"  {info.commit.hex()[:12]}  step {info.step:5d}  val_acc {info.metrics.get('val_acc', float('nan')):.4f}")
        best_model = SmallCNN()
        state = ckpt.load_best(model=best_model)
        print(f"best checkpoint: step {state['step']}, val_acc {state['metrics']['val_acc']:.4f}, "
              f"test accuracy {accuracy(best_model, test):.4f}")

        repo = ckpt.repo
        before = lmdb_info(repo)
        s = gc(repo)
        after = lmdb_info(repo)
        st = repo.stats()
        print(f"\ngc: removed {s.chunks_swept} chunks / {s.objects_swept} objects "
              f"({s.bytes_freed / 1e6:.2f} MB freed inside the database; re-encoded {s.reencoded} chunks)")
        print(f"database file {before['file_bytes'] / 1e6:.2f} MB, free pages {before['free_pages']} -> "
              f"{after['free_pages']} (reused by the next commits; `coralfs gc --compact` shrinks the file)")
        print(f"stored {st['stored_bytes'] / 1e6:.2f} MB for {st['file_versions']} checkpoint versions of "
              f"{st['logical_bytes'] / max(1, st['file_versions']) / 1e6:.2f} MB each")


if __name__ == "__main__":
    main()
