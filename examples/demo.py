"""coralfs end to end on a small built-in example (run by `make demo`).

Trains a small model on CPU, versions its checkpoints with the `coralfs` CLI, branches,
tags, then mounts the repository and loads old versions straight from the mount,
checking every file read back is byte-identical to what was written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import torch

CLI = [sys.executable, "-m", "coralfs"]


def sh(*args: str, cwd: str | None = None) -> str:
    print("$ coralfs " + " ".join(args))
    out = subprocess.run([*CLI, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout
    if out.strip():
        print("  " + out.rstrip().replace("\n", "\n  "))
    return out


def sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def make_data(n: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two interleaved spirals: small, learnable, built in."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * 4 * torch.pi
    y = torch.randint(0, 2, (n,), generator=g)
    r = t / (4 * torch.pi)
    x = torch.stack([r * torch.cos(t + y * torch.pi), r * torch.sin(t + y * torch.pi)], 1)
    return x + 0.02 * torch.randn(x.shape, generator=g), y


def main() -> int:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    work = tempfile.mkdtemp(prefix="coralfs-demo-")
    repo = os.path.join(work, "repo")
    mnt = os.path.join(work, "mnt")
    try:
        sh("init", repo)
        x, y = make_data()
        model = torch.nn.Sequential(torch.nn.Linear(2, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                    torch.nn.ReLU(), torch.nn.Linear(256, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        written: dict[str, str] = {}
        ckpt = os.path.join(repo, "model.pt")
        for epoch in range(1, 6):
            for i in range(0, len(x), 128):
                loss = torch.nn.functional.cross_entropy(model(x[i:i + 128]), y[i:i + 128])
                opt.zero_grad()
                loss.backward()
                opt.step()
            acc = (model(x).argmax(1) == y).float().mean().item()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch}, ckpt)
            sh("add", "model.pt", cwd=repo)
            sh("commit", "-m", f"epoch {epoch}", "--metric", f"accuracy={acc:.4f}", "--metric",
               f"loss={loss.item():.4f}", cwd=repo)
            written[f"epoch {epoch}"] = sha(ckpt)
        sh("tag", "v1.0", "--metric", f"accuracy={acc:.4f}", "-m", "demo release", cwd=repo)
        sh("branch", "experiment/fine-tune", cwd=repo)
        sh("checkout", "experiment/fine-tune", cwd=repo)
        for g in opt.param_groups:
            g["lr"] = 1e-4
        for i in range(0, len(x), 128):
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 128]), y[i:i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 6}, ckpt)
        written["fine-tune"] = sha(ckpt)
        sh("add", "model.pt", cwd=repo)
        sh("commit", "-m", "fine-tune at lr 1e-4", cwd=repo)
        sh("log", "--oneline", cwd=repo)
        sh("stats", cwd=repo)

        # rollback: the work tree file becomes the tagged version, byte for byte
        sh("checkout", "v1.0", cwd=repo)
        assert sha(ckpt) == written["epoch 5"], "checkout is not byte-exact"
        print("checkout v1.0: model.pt is byte-identical to epoch 5")

        # every version as a directory, without checkout
        if os.path.exists("/dev/fuse") and shutil.which("fusermount3"):
            os.makedirs(mnt)
            sh("mount", repo, mnt)
            try:
                print("$ ls", mnt, "->", sorted(os.listdir(mnt)))
                commits = sorted(os.listdir(os.path.join(mnt, "@commits")))
                print(f"$ ls {mnt}/@commits -> {len(commits)} commits")
                sd = torch.load(os.path.join(mnt, "@tags", "v1.0", "model.pt"), weights_only=True)
                print(f"torch.load from @tags/v1.0: epoch {sd['epoch']}")
                assert sha(os.path.join(mnt, "@tags", "v1.0", "model.pt")) == written["epoch 5"]
                assert sha(os.path.join(mnt, "experiment", "fine-tune", "model.pt")) == written["fine-tune"]
                print("mount: files are byte-identical to what was written")
                # writing is committing: torch.save into a branch directory makes a commit
                target = os.path.join(mnt, "main", "from_mount.pt")
                torch.save({"model": model.state_dict(), "epoch": 7}, target)
                fd = os.open(os.path.join(mnt, "main"), os.O_RDONLY)
                try:
                    os.fsync(fd)  # commit now instead of after the quiet period
                finally:
                    os.close(fd)
                written["mount"] = sha(target)
                sh("log", "-n", "1", "--oneline", "main", cwd=repo)
            finally:
                sh("umount", mnt)
            back = subprocess.run([*CLI, "cat", "main:from_mount.pt"], cwd=repo, check=True,
                                  capture_output=True).stdout
            assert hashlib.sha256(back).hexdigest() == written["mount"]
            print("torch.save through the mount became a commit on main, byte-identical")
        else:
            print("(no /dev/fuse or fusermount3 here: skipping the mount part of the demo)")
        print(f"\ndemo OK (work dir {work})")
        return 0
    finally:
        if os.environ.get("CORALFS_DEMO_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
