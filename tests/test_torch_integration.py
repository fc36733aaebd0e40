"""CheckpointManager: real (tiny) training, retention, exact resume, plain torch.load."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from coralfs.fsck import fsck
from coralfs.repository import Repository
from coralfs.training import CheckpointManager


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny kernels: one intra-op thread is fastest and does not suffer on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 64)
        self.bn = torch.nn.BatchNorm1d(64)
        self.drop = torch.nn.Dropout(0.2)  # consumes the torch RNG in every step
        self.fc2 = torch.nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Data from all three global RNGs, so resuming must restore each of them."""
    x = torch.randn(32, 16)
    x[:, 2] += float(np.random.rand()) * 0.1 + random.random() * 0.1
    y = (x[:, 0] + x[:, 1] > 0).long()
    return x, y


def _setup(seed: int = 0) -> tuple[Net, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    return model, opt, sched


def _train(model, opt, sched, steps, ckpt=None, eval_every: int = 0) -> None:
    for step in steps:
        model.train()
        x, y = _batch()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if ckpt is not None:
            metrics = {"loss": loss.detach()}
            if eval_every and step % eval_every == 0:
                model.eval()
                with torch.no_grad():
                    xv, yv = _fixed_val()
                    metrics["val_acc"] = float((model(xv).argmax(1) == yv).float().mean())
            ckpt.step(step, model=model, optimizer=opt, scheduler=sched, metrics=metrics)


def _fixed_val() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    x = torch.randn(256, 16, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def _same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_reproduces_an_uninterrupted_run_bitwise(tmp_path):
    model, opt, sched = _setup()
    _train(model, opt, sched, range(1, 31))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    ref_opt = opt.state_dict()

    model, opt, sched = _setup()
    with CheckpointManager(tmp_path / "runs", branch="exp/lr-1e-2", save_every_n_steps=10) as ckpt:
        _train(model, opt, sched, range(1, 21), ckpt)
        assert [c.step for c in ckpt.checkpoints()] == [20, 10]

    # a new process: other initial weights, other RNG states
    model, opt, sched = _setup(seed=123)
    with CheckpointManager(tmp_path / "runs", branch="exp/lr-1e-2", save_every_n_steps=10) as ckpt:
        start = ckpt.resume(model, opt, sched)
        assert start == 20
        _train(model, opt, sched, range(start + 1, 31), ckpt)
    _same_state(model.state_dict(), reference)  # BatchNorm buffers included
    for k, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            assert torch.equal(v, ref_opt["state"][k][name]) if torch.is_tensor(v) else v == ref_opt["state"][k][name]
    assert sched.last_epoch == 30


def test_manager_retention_best_and_plain_torch_load(tmp_path):
    model, opt, sched = _setup()
    ckpt = CheckpointManager(tmp_path / "runs", branch="exp/a", save_every_n_steps=4, save_on_best_metric="val_acc",
                             mode="max", keep_best_n=2, keep_last_n=2)
    seen: dict[int, float] = {}
    orig_save = ckpt.save

    def spy(step, model=None, optimizer=None, scheduler=None, metrics=None, *a, **kw):
        if metrics and "val_acc" in metrics:
            seen[step] = float(metrics["val_acc"])
        return orig_save(step, model, optimizer, scheduler, metrics, *a, **kw)

    ckpt.save = spy  # type: ignore[method-assign]
    _train(model, opt, sched, range(1, 41), ckpt, eval_every=4)
    infos = ckpt.checkpoints()
    assert ckpt.saves >= 10 and ckpt.prunes > 0
    assert 1 <= len(infos) <= 4 and infos[0].step == 40
    best_two = sorted(seen.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:2]
    kept_steps = {i.step for i in infos}
    assert {s for s, _ in best_two} <= kept_steps and {40, 36} <= kept_steps
    head = ckpt.repo.log(ckpt.repo.branch_head("exp/a"))[0][1]
    assert head.meta["kind"] == "checkpoint" and head.meta["step"] == "40" and "loss" in head.metrics

    fresh = Net()
    state = ckpt.load_best(model=fresh)
    assert state["step"] == best_two[0][0] and state["metrics"]["val_acc"] == best_two[0][1]
    _same_state(fresh.state_dict(), state["model"])
    latest = ckpt.load_latest()
    _same_state(latest["model"], model.state_dict())

    # an ordinary torch.save file: plain torch.load(weights_only=True) reads all of it
    with ckpt.repo.open("exp/a", "checkpoint.pt") as f:
        plain = torch.load(io.BytesIO(f.read()), weights_only=True)
    assert set(plain) >= {"model", "optimizer", "scheduler", "step", "epoch", "metrics", "rng"}
    assert set(plain["rng"]) >= {"python", "torch", "numpy"}
    assert isinstance(plain["rng"]["python"], tuple) and plain["rng"]["torch"].dtype == torch.uint8
    assert fsck(ckpt.repo).ok
    ckpt.close()


def test_gc_from_manager_bounds_the_repository(tmp_path, monkeypatch):
    monkeypatch.setattr("coralfs.gc.GRACE_SECONDS", 0.0)
    model, opt, sched = _setup()
    with CheckpointManager(tmp_path / "runs", branch="b", save_every_n_steps=2, keep_last_n=1,
                           gc_every_n_prunes=3) as ckpt:
        _train(model, opt, sched, range(1, 25), ckpt)
        assert ckpt.last_gc is not None and ckpt.last_gc.chunks_swept > 0
        assert len(ckpt.checkpoints()) == 1
        repo = ckpt.repo
        stats = repo.stats()
        assert stats["file_versions"] == 1
        assert fsck(repo).ok


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models_roundtrip_bit_exactly(tmp_path, dtype):
    model, _, _ = _setup()
    model = model.to(dtype)
    with CheckpointManager(tmp_path / "r", branch="lp") as ckpt:
        ckpt.step(1, model=model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-2)
        ckpt.step(2, model=model)
        fresh = Net().to(dtype)
        ckpt.load_latest(model=fresh)
        _same_state(fresh.state_dict(), model.state_dict())
        assert fresh.fc1.weight.dtype == dtype


def test_branch_forks_from_default_head_and_prune_keeps_it(tmp_path):
    repo = Repository.init(tmp_path / "r")
    e = repo.save({"w": torch.ones(4)}, "base.pt", stage=False)
    base = repo.commit_changes("main", {"base.pt": e}, "base model")
    model, opt, sched = _setup()
    with CheckpointManager(repo, branch="exp/ft", keep_last_n=1) as ckpt:
        _train(model, opt, sched, range(1, 4), ckpt)
        log = repo.log("exp/ft")
        assert [c.meta.get("step") for _, c in log] == ["3", None] and log[-1][0] == base
        assert set(repo.ls("exp/ft")) == {"base.pt", "checkpoint.pt"}
    assert repo.branch_head("main") == base
    repo.close()


def test_async_save_and_epochs(tmp_path):
    model, opt, sched = _setup()
    with CheckpointManager(tmp_path / "r", branch="e", save_every_n_epochs=2, async_save=True) as ckpt:
        for epoch in range(4):
            _train(model, opt, sched, range(epoch * 3 + 1, epoch * 3 + 4))
            ckpt.epoch_end(epoch, step=(epoch + 1) * 3, model=model, optimizer=opt, scheduler=sched)
        ckpt.wait()
        infos = ckpt.checkpoints()
        assert [(i.step, i.epoch) for i in infos] == [(12, 3), (6, 1)]
        _same_state(ckpt.load_latest()["model"], model.state_dict())


def test_mount_path_mode_writes_plain_files(tmp_path):
    model, opt, sched = _setup()
    d = tmp_path / "mnt" / "exp"
    with CheckpointManager(mount_path=d, save_every_n_steps=2) as ckpt:
        _train(model, opt, sched, range(1, 5), ckpt)
    assert (d / "checkpoint.pt").exists()
    fresh, opt2, sched2 = _setup(seed=5)
    with CheckpointManager(mount_path=d) as ckpt:
        assert ckpt.resume(fresh, opt2, sched2) == 4
    _same_state(fresh.state_dict(), model.state_dict())
