"""Training integration: version checkpoints from a PyTorch training loop.

::

    from coralfs.training import CheckpointManager

    ckpt = CheckpointManager("./runs_repo", branch="exp/lr-3e-4", save_every_n_steps=500,
                             save_on_best_metric="val_acc", mode="max", keep_best_n=3, keep_last_n=2)
    start = ckpt.resume(model, optimizer, scheduler)        # 0 on a fresh branch
    for step in range(start + 1, total + 1):
        ...train one step...
        ckpt.step(step, model=model, optimizer=optimizer, scheduler=scheduler,
                  metrics={"val_acc": acc, "loss": loss})
    state = ckpt.load_best(model=model)                     # or load_latest(), load(rev)

Every saved checkpoint is one commit on the branch (created when missing: from the default
branch's head if it has one, else as a new root). The commit carries the metrics (numbers)
and ``meta`` ``{"kind": "checkpoint", "step": ..., "epoch": ...}``; the file
(``checkpoint.pt`` by default) is an ordinary ``torch.save`` file::

    {"format": "coralfs.checkpoint/1", "step": int, "epoch": int | None, "metrics": {str: float},
     "model": state_dict, "optimizer": state_dict, "scheduler": state_dict,   # those given
     "rng": {"python": tuple, "torch": ByteTensor, "numpy": tuple (if numpy is imported),
             "cuda": [ByteTensor, ...] (if CUDA is initialised)},
     "extra": whatever was passed as extra=}

It loads with plain ``torch.load(f, weights_only=True)``: RNG states are stored as tensors,
tuples and numbers (numpy's legacy MT19937 state as ``(name, int64 tensor, pos, has_gauss,
cached)``). Module buffers (BatchNorm running stats) come with ``state_dict``; bf16/fp16
models are stored bit-exactly. What ``weights_only`` cannot load is whatever a custom
scheduler or ``extra=`` puts in its state (arbitrary classes); pass ``weights_only=False``
to ``load`` for such files you trust. Not saved: DataLoader/sampler positions and
``numpy.random.Generator`` objects (pass their state via ``extra=``).

When to save (``step()``): every ``save_every_n_steps`` steps, whenever the metric named by
``save_on_best_metric`` improves (``mode`` "max" or "min"), or on every call when neither is
set. ``save_every_n_epochs`` saves from ``epoch_end(epoch, ...)`` (0-based epoch index: saves
when ``(epoch + 1) % n == 0``). ``save()`` saves unconditionally.

Retention: with ``keep_last_n``/``keep_best_n`` each save is followed by a prune of the branch
(:mod:`coralfs.prune`: the branch is rewritten to keep the newest N and the best N checkpoints
by ``metric``, default ``save_on_best_metric``; the newest is always kept). Space comes back
with ``coralfs gc`` (or ``gc_every_n_prunes=K``: this manager runs gc after every K prunes,
unless another process is writing to the repository at that moment, then it skips that
round; gc blocks other writers while it runs).

``async_save=True`` snapshots the state (tensor copies) in the loop and does serialisation,
ingest and commit on a background thread (one save in flight; a second one waits for it);
errors surface at the next call, ``wait()`` or ``close()``.

Mount mode: if the path given is a directory inside a mounted coralfs branch (a FUSE mount
of type ``fuse.coralfs``), or ``mount_path=`` is given, checkpoints are written there with
``torch.save`` (temporary file + rename + fsync) and the mount turns each into a commit.
Retention, ``load_best`` and commit metrics are not available in this mode (the mount
decides commit messages); ``load_latest``/``resume`` read the file back.
"""

from __future__ import annotations

import io
import math
import os
import queue
import random
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from coralfs.errors import CoralError, InvalidArgument, NotARepository, RepositoryExists, UnknownRevision

if TYPE_CHECKING:
    from coralfs.repository import Repository

FORMAT = "coralfs.checkpoint/1"
KIND = "checkpoint"


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint commit on the branch."""

    commit: bytes
    step: int | None
    epoch: int | None
    metrics: dict[str, float]
    time: float
    message: str


# ------------------------------------------------------------------ RNG state
def rng_state() -> dict[str, Any]:
    """Global RNG states, as values ``torch.load(weights_only=True)`` accepts."""
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    np = sys.modules.get("numpy")
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        state["numpy"] = (str(name), torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss),
                          float(cached))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (parts missing from ``state`` are left alone)."""
    import torch

    if "python" in state:
        v = state["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _snapshot(obj: Any) -> Any:
    """A deep copy of tensors (to CPU) inside dicts/lists/tuples; other values as they are."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        out = {k: _snapshot(v) for k, v in obj.items()}
        return out if type(obj) is dict else type(obj)(out)
    if isinstance(obj, list):
        return [_snapshot(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_snapshot(v) for v in obj)
    return obj


def _number(v: Any) -> float | None:
    try:
        f = float(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError, RuntimeError):
        return None
    return f


def _coralfs_mount_of(path: str) -> str | None:
    """The mount point if ``path`` is inside a coralfs FUSE mount (``fuse.coralfs``), else None."""
    p = os.path.realpath(path)
    best: tuple[str, str] | None = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mnt = left.split()[4].encode().decode("unicode_escape")
                fstype = right.split()[0] if right else ""
                if (p == mnt or p.startswith(mnt.rstrip("/") + "/")) and (best is None or len(mnt) > len(best[0])):
                    best = (mnt, fstype)
    except (OSError, IndexError):
        return None
    return best[0] if best and best[1] == "fuse.coralfs" else None


# ------------------------------------------------------------------ the manager
class CheckpointManager:
    """Save, prune and restore training checkpoints as commits on a branch (see the module doc)."""

    def __init__(self, repo: str | os.PathLike[str] | Repository | None = None, branch: str | None = None, *,
                 path: str = "checkpoint.pt", save_every_n_steps: int | None = None,
                 save_every_n_epochs: int | None = None, save_on_best_metric: str | None = None,
                 mode: str = "max", keep_best_n: int | None = None, keep_last_n: int | None = None,
                 metric: str | None = None, gc_every_n_prunes: int | None = None, async_save: bool = False,
                 author: str | None = None, mount_path: str | os.PathLike[str] | None = None,
                 map_location: Any = "cpu") -> None:
        if mode not in ("max", "min"):
            raise InvalidArgument(f"mode must be 'max' or 'min', not {mode!r}")
        for name, v in (("save_every_n_steps", save_every_n_steps), ("save_every_n_epochs", save_every_n_epochs),
                        ("gc_every_n_prunes", gc_every_n_prunes)):
            if v is not None and v < 1:
                raise InvalidArgument(f"{name} must be >= 1")
        for name, v in (("keep_best_n", keep_best_n), ("keep_last_n", keep_last_n)):
            if v is not None and v < 0:
                raise InvalidArgument(f"{name} must be >= 0")
        self.path = path
        self.save_every_n_steps = save_every_n_steps
        self.save_every_n_epochs = save_every_n_epochs
        self.save_on_best_metric = save_on_best_metric
        self.metric = metric or save_on_best_metric
        self.mode = mode
        self.keep_best_n = keep_best_n
        self.keep_last_n = keep_last_n
        self.gc_every_n_prunes = gc_every_n_prunes
        self.author = author
        self.map_location = map_location
        if keep_best_n and not self.metric:
            raise InvalidArgument("keep_best_n needs save_on_best_metric or metric")
        self.repo: Repository | None = None
        self.mount_dir: str | None = None
        self._own_repo = False
        if mount_path is None and repo is not None and not hasattr(repo, "store"):
            p = os.fspath(repo)  # type: ignore[arg-type]
            if _coralfs_mount_of(p if os.path.exists(p) else os.path.dirname(os.path.abspath(p)) or "."):
                mount_path = p
        if mount_path is not None:
            if keep_best_n or keep_last_n or gc_every_n_prunes:
                raise InvalidArgument("retention (keep_*_n, gc) is not available in mount mode")
            self.mount_dir = os.path.abspath(os.fspath(mount_path))
            os.makedirs(self.mount_dir, exist_ok=True)
            self.branch = branch or ""
        else:
            self.repo = self._open_repo(repo)
            self.branch = branch or self.repo.current_branch() or self.repo.default_branch
            self._ensure_branch()
        self._queue: queue.Queue[Any] | None = None
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None
        self.saves = 0
        self.prunes = 0
        self.last_commit: bytes | None = None
        self.last_gc: Any = None
        self._last_saved_step: int | None = None
        self._best: float | None = None
        if self.repo is not None and self.save_on_best_metric:
            best = self._best_info(self.save_on_best_metric, self.mode)
            if best is not None:
                self._best = best.metrics[self.save_on_best_metric]
        if async_save:
            self._queue = queue.Queue(maxsize=1)
            self._worker = threading.Thread(target=self._work, name="coralfs-checkpoint", daemon=True)
            self._worker.start()

    # -------------------------------------------------------------- repository
    def _open_repo(self, repo: Any) -> Repository:
        from coralfs.repository import Repository

        if repo is not None and hasattr(repo, "store"):
            return repo  # type: ignore[no-any-return]
        try:
            r = Repository(repo)
        except NotARepository:
            if repo is None:
                raise
            try:
                r = Repository.init(repo)
            except RepositoryExists:  # another process created it meanwhile
                r = Repository(repo)
        self._own_repo = True
        return r

    def _ensure_branch(self) -> None:
        from coralfs.errors import RefExists
        from coralfs.store import refs

        assert self.repo is not None
        refs.check_ref_name(self.branch)
        if self.repo.branch_head(self.branch) is not None:
            return
        default = self.repo.default_branch
        head = self.repo.branch_head(default) if default != self.branch else None
        if head is not None:
            try:
                self.repo.create_branch(self.branch, default)
            except RefExists:
                pass  # created meanwhile by someone else: fine
        # else: the first checkpoint commit creates the branch as a new root

    def close(self) -> None:
        """Wait for a background save, then release the repository (if this manager opened it)."""
        try:
            self.wait()
        finally:
            if self._worker is not None and self._queue is not None:
                self._queue.put(None)
                self._worker.join()
                self._worker = None
            if self._own_repo and self.repo is not None:
                self.repo.close()
                self._own_repo = False

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- saving
    def _better(self, v: float) -> bool:
        if not math.isfinite(v):
            return False
        if self._best is None:
            return True
        return v > self._best if self.mode == "max" else v < self._best

    def should_save(self, step: int, metrics: Mapping[str, Any] | None = None) -> bool:
        """Whether ``step()`` with these arguments saves."""
        if self.save_every_n_steps is None and self.save_on_best_metric is None:
            return self.save_every_n_epochs is None
        if self.save_every_n_steps and step % self.save_every_n_steps == 0 and step != self._last_saved_step:
            return True
        if self.save_on_best_metric and metrics and self.save_on_best_metric in metrics:
            v = _number(metrics[self.save_on_best_metric])
            if v is not None and self._better(v):
                return True
        return False

    def step(self, step: int, model: Any = None, optimizer: Any = None, scheduler: Any = None,
             metrics: Mapping[str, Any] | None = None, epoch: int | None = None, extra: Any = None,
             force: bool = False) -> bytes | None:
        """Call once per training step; saves when the policy says so (or ``force``).

        Returns the new commit id (None when nothing was saved, or with ``async_save``)."""
        self._raise_pending()
        if not force and not self.should_save(step, metrics):
            return None
        return self.save(step, model, optimizer, scheduler, metrics, epoch, extra)

    def epoch_end(self, epoch: int, step: int | None = None, model: Any = None, optimizer: Any = None,
                  scheduler: Any = None, metrics: Mapping[str, Any] | None = None, extra: Any = None
                  ) -> bytes | None:
        """Call at the end of each epoch (0-based ``epoch``); saves every ``save_every_n_epochs``."""
        self._raise_pending()
        n = self.save_every_n_epochs
        if n is None or (epoch + 1) % n != 0:
            return None
        return self.save(step if step is not None else epoch + 1, model, optimizer, scheduler, metrics, epoch,
                         extra)

    def save(self, step: int, model: Any = None, optimizer: Any = None, scheduler: Any = None,
             metrics: Mapping[str, Any] | None = None, epoch: int | None = None, extra: Any = None,
             message: str | None = None) -> bytes | None:
        """Save a checkpoint now (a commit on the branch); then prune/gc as configured."""
        self._raise_pending()
        nums: dict[str, float] = {}
        for k, v in (metrics or {}).items():
            f = _number(v)
            if f is not None:
                nums[str(k)] = f
        payload: dict[str, Any] = {"format": FORMAT, "step": int(step),
                                   "epoch": None if epoch is None else int(epoch), "metrics": dict(nums)}
        if model is not None:
            payload["model"] = model.state_dict()
        if optimizer is not None:
            payload["optimizer"] = optimizer.state_dict()
        if scheduler is not None:
            payload["scheduler"] = scheduler.state_dict()
        payload["rng"] = rng_state()
        if extra is not None:
            payload["extra"] = extra
        # policy state moves now, so step() decisions do not depend on the background thread
        self._last_saved_step = int(step)
        if self.save_on_best_metric and self.save_on_best_metric in nums and \
                self._better(nums[self.save_on_best_metric]):
            self._best = nums[self.save_on_best_metric]
        msg = message or (f"checkpoint step {int(step)}" + (f" epoch {int(epoch)}" if epoch is not None else "")
                          + "".join(f" {k}={v:.6g}" for k, v in sorted(nums.items())))
        meta = {"kind": KIND, "step": str(int(step))}
        if epoch is not None:
            meta["epoch"] = str(int(epoch))
        if self._queue is not None:
            job = (_snapshot(payload), msg, nums, meta)
            self._queue.put(job)  # blocks while the previous save is still queued
            return None
        return self._write(payload, msg, nums, meta)

    def _write(self, payload: dict[str, Any], msg: str, nums: dict[str, float], meta: dict[str, str]) -> bytes | None:
        if self.mount_dir is not None:
            self._write_mount(payload)
            self.saves += 1
            return None
        repo = self.repo
        assert repo is not None
        with repo.writing():
            prev = None
            head = repo.branch_head(self.branch)
            if head is not None:
                prev = repo.tree(head).entries.get(self.path)
            entry = repo.save(payload, self.path, stage=False, prev=prev)
            cid = repo.commit_changes(self.branch, {self.path: entry}, msg, metrics=nums, meta=meta,
                                      author=self.author, allow_empty=True)
        self.saves += 1
        self.last_commit = cid
        if self.keep_last_n is not None or self.keep_best_n is not None:
            self.prune()
        return cid

    def _write_mount(self, payload: dict[str, Any]) -> None:
        import torch

        assert self.mount_dir is not None
        final = os.path.join(self.mount_dir, self.path)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())  # the mount ingests at flush/fsync: errors surface here
        os.replace(tmp, final)

    def prune(self) -> Any:
        """Apply ``keep_last_n``/``keep_best_n`` to the branch now; maybe run gc. Returns the plan."""
        from coralfs.prune import prune_branch

        if self.repo is None:
            raise InvalidArgument("prune is not available in mount mode")
        plan = prune_branch(self.repo, self.branch, self.keep_last_n, self.keep_best_n, self.metric, self.mode)
        if plan.changes:
            self.prunes += 1
            if plan.new_head is not None:
                self.last_commit = plan.new_head
            if self.gc_every_n_prunes and self.prunes % self.gc_every_n_prunes == 0:
                from coralfs.errors import ConcurrentUpdate
                from coralfs.gc import gc

                try:  # never wait behind another writer: skip, and try again after the next N prunes
                    self.last_gc = gc(self.repo, wait=False)
                except ConcurrentUpdate:
                    self.last_gc = None
        return plan

    # -------------------------------------------------------------- background saves
    def _work(self) -> None:
        assert self._queue is not None
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    try:
                        self._write(*job)
                    except BaseException as e:  # surfaced in the training thread
                        self._error = e
            finally:
                self._queue.task_done()

    def wait(self) -> None:
        """Wait until background saves are written; re-raises a background error."""
        if self._queue is not None:
            self._queue.join()
        self._raise_pending()

    def _raise_pending(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise CoralError(f"a background checkpoint save failed: {e}") from e

    # -------------------------------------------------------------- history
    def checkpoints(self) -> list[CheckpointInfo]:
        """Checkpoint commits on the branch (first-parent history), newest first."""
        self.wait()
        if self.repo is None:
            return []
        out: list[CheckpointInfo] = []
        cur = self.repo.branch_head(self.branch)
        while cur is not None:
            c = self.repo.get_commit(cur)
            if c.meta.get("kind") == KIND:
                step = c.meta.get("step")
                epoch = c.meta.get("epoch")
                out.append(CheckpointInfo(cur, int(step) if step is not None else None,
                                          int(epoch) if epoch is not None else None, dict(c.metrics), c.time,
                                          c.message))
            cur = c.parents[0] if c.parents else None
        return out

    def _best_info(self, metric: str, mode: str) -> CheckpointInfo | None:
        best: CheckpointInfo | None = None
        for info in self.checkpoints():  # newest first: ties go to the newer
            v = info.metrics.get(metric)
            if v is None or not math.isfinite(v):
                continue
            if best is None or (v > best.metrics[metric] if mode == "max" else v < best.metrics[metric]):
                best = info
        return best

    # -------------------------------------------------------------- loading
    def load(self, rev: str | bytes | None = None, model: Any = None, optimizer: Any = None,
             scheduler: Any = None, restore_rng: bool = False, map_location: Any = None,
             weights_only: bool = True, strict: bool = True) -> dict[str, Any]:
        """Load the checkpoint at ``rev`` (default: the branch head) and restore what is given."""
        import torch

        self.wait()
        loc = map_location if map_location is not None else self.map_location
        if self.mount_dir is not None:
            if rev is not None:
                raise InvalidArgument("mount mode loads the latest checkpoint only")
            with open(os.path.join(self.mount_dir, self.path), "rb") as f:
                state = torch.load(f, map_location=loc, weights_only=weights_only)
        else:
            assert self.repo is not None
            if rev is None:
                cid = self.repo.branch_head(self.branch)
                if cid is None:
                    raise UnknownRevision(f"branch {self.branch!r} has no checkpoints")
            else:
                cid = rev if isinstance(rev, bytes) else self.repo.resolve(rev)
            with self.repo.open(cid, self.path) as raw:
                buf = io.BufferedReader(raw, 8 << 20)
                state = torch.load(buf, map_location=loc, weights_only=weights_only)
        if model is not None and "model" in state:
            model.load_state_dict(state["model"], strict=strict)
        if optimizer is not None and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        if restore_rng and "rng" in state:
            set_rng_state(state["rng"])
        return state  # type: ignore[no-any-return]

    def load_latest(self, model: Any = None, optimizer: Any = None, scheduler: Any = None,
                    **kw: Any) -> dict[str, Any]:
        return self.load(None, model, optimizer, scheduler, **kw)

    def load_best(self, model: Any = None, optimizer: Any = None, scheduler: Any = None,
                  metric: str | None = None, mode: str | None = None, **kw: Any) -> dict[str, Any]:
        """The checkpoint with the best ``metric`` (default: the manager's) on the branch."""
        metric = metric or self.metric
        if not metric:
            raise InvalidArgument("load_best needs a metric (save_on_best_metric, metric=)")
        if self.mount_dir is not None:
            raise InvalidArgument("load_best is not available in mount mode")
        best = self._best_info(metric, mode or self.mode)
        if best is None:
            raise UnknownRevision(f"no checkpoint on {self.branch!r} has metric {metric!r}")
        return self.load(best.commit, model, optimizer, scheduler, **kw)

    def resume(self, model: Any, optimizer: Any = None, scheduler: Any = None, **kw: Any) -> int:
        """Restore model, optimizer, scheduler and RNG states from the newest checkpoint.

        Returns its step (0 when the branch has no checkpoint yet), so a loop continues
        with ``step + 1``: the next step is then exactly the step an uninterrupted run takes."""
        if self.mount_dir is not None:
            if not os.path.exists(os.path.join(self.mount_dir, self.path)):
                return 0
        else:
            assert self.repo is not None
            self.wait()
            head = self.repo.branch_head(self.branch)
            if head is None or self.path not in self.repo.tree(head).entries:
                return 0
        state = self.load(None, model, optimizer, scheduler, restore_rng=True, **kw)
        step = int(state.get("step", 0))
        self._last_saved_step = step
        return step

