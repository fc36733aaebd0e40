"""The gc interlock: writers share ``.coralfs/gc.lock``, gc holds it alone.

Across processes this is a ``flock`` on ``gc.lock``: shared while any writer of a process
has chunks that nothing references yet, exclusive for gc. Within one process a second
``flock`` on another file descriptor conflicts with the first exactly as another process
would, so a process's own background repack used to make its own gc fail with "busy"
(``CheckpointManager``'s periodic gc was skipped whenever the repack thread held the
lock). :class:`GcGate` adds the in-process half: one gate per lock file and process,
shared by every ``Repository`` object on it. Writers of the process count in the gate and
hold one shared ``flock`` between them; gc first waits for the process's own writers
(work this process is doing, always bounded: the repacker holds the lock only around
each write batch), keeping new ones out meanwhile (writer preference, so a busy
repacker cannot starve it), and then takes the ``flock`` exclusively, which is where it
may refuse (``wait=False``) because another *process* is writing.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Callable, Iterator

from coralfs.errors import ConcurrentUpdate

log = logging.getLogger(__name__)

_gates: dict[str, GcGate] = {}
_gates_lock = threading.Lock()


def gate_for(path: str) -> GcGate:
    """The process-wide gate of lock file ``path``."""
    key = os.path.realpath(path)
    with _gates_lock:
        g = _gates.get(key)
        if g is None:
            g = _gates[key] = GcGate(key)
        return g


class GcGate:
    """A reader-writer lock over a ``flock`` file, correct both within and across processes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._cond = threading.Condition()
        self._shared = 0  # writers of this process inside the gate
        self._fd: int | None = None  # holds LOCK_SH while _shared > 0
        self._acquiring = False  # a thread is taking the shared flock (outside the condition)
        self._owner: int | None = None  # thread holding the exclusive side
        self._waiting = 0  # threads waiting for the exclusive side
        self._local = threading.local()

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def in_shared(self) -> bool:
        """Whether this thread is inside a shared section (or the exclusive side's shared re-entry)."""
        return self._depth() > 0

    def at_exit(self, fn: Callable[[BaseException | None], None]) -> None:
        """Call ``fn(exception or None)`` when this thread's outermost shared section ends, after
        it has let go of the shared side (so ``fn`` may take the exclusive side): ingest uses it
        to remove what a write that failed for lack of space left behind (coralfs.ingest)."""
        if not self._depth():
            raise RuntimeError("at_exit outside a shared section")
        hooks = getattr(self._local, "hooks", None)
        if hooks is None:
            hooks = self._local.hooks = []
        hooks.append(fn)

    def _run_hooks(self, exc: BaseException | None) -> None:
        hooks, self._local.hooks = getattr(self._local, "hooks", None), None
        for fn in hooks or ():
            try:
                fn(exc)
            except Exception:  # noqa: BLE001 - a hook never replaces the section's own outcome
                log.warning("a write-section exit hook failed", exc_info=True)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Writers: any number at once, in any process; never while gc runs. Re-entrant per
        thread, and inside the exclusive side of the same thread."""
        me = threading.get_ident()
        exc: BaseException | None = None
        if self._depth() or self._owner == me:
            self._local.depth = self._depth() + 1
            try:
                yield
            except BaseException as e:
                exc = e
                raise
            finally:
                self._local.depth -= 1
                if not self._local.depth:  # inside this thread's exclusive side
                    self._run_hooks(exc)
            return
        with self._cond:
            while self._owner is not None or self._waiting or self._acquiring:
                self._cond.wait()
            if self._shared:
                self._shared += 1
                take = False
            else:
                self._acquiring = take = True
        if take:
            fd = -1
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
                fcntl.flock(fd, fcntl.LOCK_SH)  # waits while another process's gc runs
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                with self._cond:
                    self._acquiring = False
                    self._cond.notify_all()
                raise
            with self._cond:
                self._fd, self._shared, self._acquiring = fd, 1, False
                self._cond.notify_all()
        self._local.depth = 1
        try:
            yield
        except BaseException as e:
            exc = e
            raise
        finally:
            self._local.depth = 0
            with self._cond:
                self._shared -= 1
                if not self._shared and self._fd is not None:
                    os.close(self._fd)  # releases the shared flock
                    self._fd = None
                self._cond.notify_all()
            self._run_hooks(exc)

    @contextlib.contextmanager
    def exclusive(self, wait: bool = True) -> Iterator[None]:
        """gc: waits for this process's writers; then, across processes, waits for (or with
        ``wait=False`` refuses, ConcurrentUpdate) writers of other processes."""
        me = threading.get_ident()
        if self._owner == me:  # re-entrant: this thread has it already
            yield
            return
        if self._depth():
            raise ConcurrentUpdate("gc cannot run inside a write (this thread holds the write lock)")
        with self._cond:
            self._waiting += 1
            try:
                while self._shared or self._acquiring or self._owner is not None:
                    self._cond.wait()
                self._owner = me
            finally:
                self._waiting -= 1
        fd = -1
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError as e:
                raise ConcurrentUpdate("the repository is busy (another process is writing to it)") from e
            yield
        finally:
            if fd >= 0:
                os.close(fd)
            with self._cond:
                self._owner = None
                self._cond.notify_all()
