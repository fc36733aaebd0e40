"""fsx (tests/fsx_coral.py) on a branch file of a real mount with a 0.1 s commit delay.

``make test``: 300 operations on each of two seeds, mmap reads and writes on, the second
with another process committing to the branch meanwhile (~8 s). ``CORALFS_DEEP=1`` (``make
test-deep``): 100k operations in all over four seeds (``CORALFS_FSX_OPS`` operations for each
of ``CORALFS_FSX_SEEDS``, a comma-separated list; every second seed with the other process).
The races these find are timing-dependent: a pass on one run is no proof.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_mount_snapshot import DEEP, ROOT, _env, seeded_repo

# (seed, extra fsx arguments): plain, and with another process committing another file of
# the branch every 0.05 s on average ("churn": the branch moves under the open file, and the
# mount's commits of the closed file race the kernel's attribute refreshes)
CHURN = ["--churn", "0.05", "--commit-check", "0.05", "--maxlen", "65536"]
if DEEP:
    SEEDS = [int(s) for s in os.environ.get("CORALFS_FSX_SEEDS", "1301,1302,1303,1304").split(",")]
    OPS = int(os.environ.get("CORALFS_FSX_OPS", str(100_000 // len(SEEDS))))
else:
    SEEDS = [int(s) for s in os.environ.get("CORALFS_FSX_SEEDS", "1301,1302").split(",")]
    OPS = int(os.environ.get("CORALFS_FSX_OPS", "300"))
RUNS = [(seed, CHURN if i % 2 else []) for i, seed in enumerate(SEEDS)]


@pytest.mark.parametrize(("seed", "extra"), RUNS, ids=[f"{s}{'-churn' if e else ''}" for s, e in RUNS])
def test_fsx_on_a_branch_file(make_repo, fuse_mount, tmp_path: Path, seed: int, extra: list[str]) -> None:
    repo = seeded_repo(make_repo, {"README": b"fsx runs on main/fsx.bin\n"})
    m = fuse_mount(repo.root, "--commit-delay", "0.1")
    log = tmp_path / f"fsx-{seed}.log"
    cmd = [sys.executable, "-m", "tests.fsx_coral", "--mount", m.path, "--file", "main/fsx.bin", "--repo",
           repo.root, "--ops", str(OPS), "--seed", str(seed), "--mmap-write", "--log", str(log), *extra]
    timeout = 600 + OPS * 0.05
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"fsx did not finish in {timeout:.0f} s (op log {log}):\n{e.stderr or ''}", pytrace=False)
    if res.returncode != 0:
        how = f"killed by signal {-res.returncode}" if res.returncode < 0 else f"exit {res.returncode}"
        tail = log.read_text().splitlines()[-15:] if log.exists() else []
        pytest.fail(f"fsx {how} (seed {seed}, {OPS} ops):\n{res.stdout}{res.stderr}\n"
                    f"op log tail ({log}):\n" + "\n".join(tail) + f"\nmount log tail:\n{m.log_text()[-2000:]}",
                    pytrace=False)
    assert "fsx: ok" in res.stdout, res.stdout + res.stderr
    print(res.stdout.strip())
