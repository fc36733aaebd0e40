"""Real checkpoint files for tests: made by torch.save / safetensors from real (tiny) training."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch


def sha256(path_or_bytes: str | os.PathLike[str] | bytes) -> str:
    if isinstance(path_or_bytes, bytes):
        return hashlib.sha256(path_or_bytes).hexdigest()
    h = hashlib.sha256()
    with open(path_or_bytes, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


class TinyNet(torch.nn.Module):
    def __init__(self, d: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(64, d)
        self.fc1 = torch.nn.Linear(d, d)
        self.bn = torch.nn.BatchNorm1d(d)
        self.fc2 = torch.nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(self.emb(x).mean(1)))))


def train_steps(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 64, (16, 8), generator=g)
        y = (x.sum(1) % 4)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def training_series(n: int, steps_between: int = 3, seed: int = 0) -> list[dict]:
    """``n`` successive full training checkpoints (model + AdamW state + step)."""
    torch.manual_seed(seed)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = []
    for i in range(n):
        train_steps(model, opt, steps_between, seed + i)
        out.append({"model": {k: v.clone() for k, v in model.state_dict().items()},
                    "optimizer": opt.state_dict(), "step": (i + 1) * steps_between})
    return out


def save_pt(obj: object, path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, p)
    return p


def varied_state_dict() -> dict:
    """Many dtypes and storage layouts in one torch.save payload."""
    torch.manual_seed(1)
    base = torch.randn(8, 6)
    shared = torch.arange(20, dtype=torch.float32)
    return {
        "f32": base,
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "f64": base.double(),
        "i8": torch.randint(-128, 127, (10,), dtype=torch.int8),
        "u8": torch.randint(0, 255, (10,), dtype=torch.uint8),
        "i16": torch.randint(-1000, 1000, (7,), dtype=torch.int16),
        "i32": torch.randint(-1000, 1000, (7,), dtype=torch.int32),
        "i64": torch.arange(12, dtype=torch.int64),
        "bool": torch.rand(9) > 0.5,
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(3.5),
        "view_a": shared[2:10],          # two views sharing one storage
        "view_b": shared[5:15],
        "transposed": base.t(),           # non-contiguous view
        "strided": base[:, ::2],
        "complex": torch.randn(3, dtype=torch.complex64),
        "nested": {"list": [torch.ones(2), {"deep": torch.zeros(3, dtype=torch.int16)}], "n": 5, "s": "text"},
    }


class ReadersRunning:
    """``with ReadersRunning(checks) as r:`` runs every check (a callable that raises on a
    wrong read) in a loop on a thread until the block ends; then ``r.errors`` holds what
    failed (the thread stops at the first failure) and ``r.reads`` how many passed."""

    def __init__(self, checks: list) -> None:
        import threading

        self.checks = checks
        self.errors: list[BaseException] = []
        self.reads = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for check in self.checks:
                try:
                    check()
                    self.reads += 1
                except BaseException as e:  # noqa: BLE001 - reported by the test
                    self.errors.append(e)
                    return

    def __enter__(self) -> ReadersRunning:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
