"""The gc interlock (coralfs.store.locks): a process's own writers never make its gc "busy"; another
process's writers do (wait=False) or are waited for; gc is never starved and never deadlocks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from coralfs.errors import ConcurrentUpdate
from coralfs.gc import gc
from coralfs.repository import Repository


@pytest.fixture
def repo(tmp_path):
    r = Repository.init(tmp_path / "r", auto_repack=False)
    yield r
    r.close()


def _hold(repo: Repository, seconds: float, started: threading.Event) -> threading.Thread:
    def run() -> None:
        with repo.writing():
            started.set()
            time.sleep(seconds)

    th = threading.Thread(target=run)
    th.start()
    assert started.wait(5)
    return th


def test_gc_waits_for_this_process_writer_instead_of_refusing(repo):
    # (the background repack is such a writer: CheckpointManager's gc used to be skipped)
    started = threading.Event()
    th = _hold(repo, 0.4, started)
    t0 = time.monotonic()
    stats = gc(repo, wait=False, grace=0.0)
    assert time.monotonic() - t0 >= 0.2  # it waited for the writer ...
    assert stats is not None  # ... and ran
    th.join()


def test_gate_is_shared_by_every_repository_object_of_the_process(repo):
    other = Repository(repo.root, auto_repack=False)
    try:
        started = threading.Event()
        th = _hold(other, 0.3, started)
        gc(repo, wait=False, grace=0.0)  # no "busy" from a second object in this process
        th.join()
    finally:
        other.close()


def test_new_writers_wait_while_gc_waits(repo):
    """Writer preference: a steady stream of short writers (a repacker's batches) cannot starve gc."""
    order: list[str] = []
    started = threading.Event()
    th = _hold(repo, 0.3, started)

    def run_gc() -> None:
        with repo.exclusive(wait=False):
            order.append("gc")
            time.sleep(0.1)

    g = threading.Thread(target=run_gc)
    g.start()
    time.sleep(0.1)  # gc is waiting now
    with repo.writing():
        order.append("writer")
    g.join()
    th.join()
    assert order == ["gc", "writer"]


def test_gc_inside_a_write_refuses_instead_of_deadlocking(repo):
    with repo.writing(), pytest.raises(ConcurrentUpdate):
        gc(repo, wait=False)


def test_writing_is_reentrant_and_nests_inside_exclusive(repo):
    with repo.writing(), repo.writing():
        pass
    with repo.exclusive(), repo.writing():  # gc's own writes
        pass


def test_another_process_writing_makes_gc_refuse_or_wait(repo):
    code = textwrap.dedent(f"""
        import sys, time
        from coralfs.repository import Repository
        r = Repository({str(repo.root)!r}, auto_repack=False)
        with r.writing():
            print("holding", flush=True)
            time.sleep(1.0)
        r.close()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "holding"
        with pytest.raises(ConcurrentUpdate):
            gc(repo, wait=False)
        t0 = time.monotonic()
        gc(repo, wait=True, grace=0.0)  # waits for the other process to finish writing
        assert time.monotonic() - t0 > 0.2
    finally:
        p.wait(10)
    assert p.returncode == 0
