"""The mount's inodes: one kernel inode per version of a file (FUSE-free, tested directly).

The kernel keeps one page cache and one size per inode. If every version of a branch
file shared one inode (libfuse's high-level API gives one inode per path), a reader
holding version 0 open would read version 0's bytes cut at version 1's size after a
commit, and an mmap of it could fault with SIGBUS. So this layer gives every *content* of
a path its own inode:

* A lookup resolves the path in the :class:`~coralfs.mount.view.MountView` and gets a token
  for its content (``("f", manifest)``, ``("w", staged id)`` for a file being written
  through this mount, ``("d",)`` for a directory). The node last handed out for the path
  is reused when its token is equal (so unchanged files keep their inode and page cache
  across commits); otherwise a new node with a new inode number is made, and the old one
  lives on, unchanged, for whoever still has it open, until the kernel forgets it.
* A node's content never changes behind the kernel: its attributes (size) and its pages
  stay those of its version, for ``fstat``, ``read`` and ``mmap`` alike, for the life of
  every handle. The only change in place is a write through this mount, on that very
  inode, which the kernel sees (the node's token becomes the staged file's; when the
  written file has been stored and closed it takes the token of what was stored, keeping
  its inode).
* When a ref moves (a commit by another process), :meth:`NodeTable.revalidate` re-resolves
  the nodes under it and returns the directory entries the kernel must drop (its cached
  name -> old inode), so the next lookup gets the new version; directories' attributes are
  refreshed. Until then (a poll interval), an ``open`` of a stale node is refused with
  ``ESTALE``: the kernel then repeats the path walk with revalidation (``LOOKUP_REVAL``)
  and opens the new version. A new open after a commit therefore sees the new version,
  never a mix.

Inode numbers are never reused (a 64-bit counter), so no generation numbers are needed.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from coralfs.errors import CoralError, PathNotFound, StaleNode, UnknownNode
from coralfs.mount.view import COMMITS, TAGS, Attr, MountView, Resolved
from coralfs.mount.writer import Staged
from coralfs.store import refs

ROOT_INO = 1
#: an ``open`` right after the lookup that returned the node is not refused as stale: the
#: kernel's revalidating retry and a racing commit must not bounce forever
LOOKUP_GRACE = 0.05


@dataclass(eq=False)
class Node:
    ino: int
    parent: int  # the inode of the directory it was looked up in (0 for the root)
    name: str
    path: str  # its mount path while it is the current node there ("" once detached)
    token: tuple[object, ...]
    attr: Attr
    immutable: bool
    staged: Staged | None = None  # a file being written through this mount
    nlookup: int = 0
    looked_up: float = 0.0  # time.monotonic() of the last lookup that returned it
    drop_cache: bool = False  # the next open must not keep the kernel's cached pages
    opens: set[int] = field(default_factory=set)  # open file handles on it
    gen: int = 0  # bumped by every change made to it here (a resolution older than that is void)

    @property
    def is_dir(self) -> bool:
        return self.token == ("d",)

    @property
    def follows_ref(self) -> bool:
        """Can the content behind its path change without the kernel knowing (a ref moved)?"""
        return not self.path.startswith(f"/{COMMITS}/") and self.path != f"/{COMMITS}"


def join(parent: str, name: str) -> str:
    return "/" + name if parent == "/" else f"{parent}/{name}"


class NodeTable:
    """Inode number -> node, and the current node of every path the kernel has looked up."""

    def __init__(self, view: MountView, clock: Callable[[], float] = time.monotonic) -> None:
        self.view = view
        self.clock = clock
        self._lock = threading.RLock()
        root = view.resolve("/")
        self._root = Node(ROOT_INO, 0, "", "/", root.token, root.attr, False, nlookup=1)
        self.by_ino: dict[int, Node] = {ROOT_INO: self._root}
        self.by_path: dict[str, Node] = {"/": self._root}
        self._inos = itertools.count(ROOT_INO + 1)
        self._refs: dict[str, bytes] | None = None
        self._stale: list[tuple[int, str]] = []  # entries found stale between polls
        # a file being written has exactly one inode, whatever its path does (the kernel's size
        # and pages of it live there): staged id -> node
        self._by_staged: dict[int, Node] = {}

    # ---------------------------------------------------------------- lookups
    def get(self, ino: int) -> Node:
        node = self.by_ino.get(ino)
        if node is None:
            raise UnknownNode(f"inode {ino} is unknown (forgotten)")
        return node

    def child_path(self, parent: int, name: str) -> str:
        p = self.get(parent)
        if not p.path:
            raise PathNotFound(f"{name}: its directory was removed")
        return join(p.path, name)

    def lookup(self, parent: int, name: str) -> Node:
        """The kernel's LOOKUP: the node for ``parent/name``, counted (``nlookup``)."""
        path = self.child_path(parent, name)
        for attempt in range(8):
            with self._lock:
                before = self.by_path.get(path)
                gen = before.gen if before is not None else -1
            res = self.view.resolve(path)
            with self._lock:
                now = self.by_path.get(path)
                if attempt < 7 and (now is not before or (now is not None and now.gen != gen)):
                    continue  # changed here while we resolved (a write opened it): resolve again
                node = self._current(path, res, parent, name)
                node.nlookup += 1
                node.looked_up = self.clock()
                return node
        raise AssertionError("unreachable")

    def _current(self, path: str, res: Resolved, parent: int, name: str) -> Node:
        """The node ``path`` resolves to now: the existing one if it shows the same content, else a
        new one (caller holds the lock)."""
        node = self.by_path.get(path)
        if node is not None and self._same(node, res):
            node.attr = res.attr
            node.parent, node.name = parent, name
            return node
        if node is not None:
            node.path = ""  # detached: it keeps its version for whoever has it open
            node.gen += 1
        if res.staged is not None:  # being written: its one inode, wherever it was seen before
            st = res.staged
            known = self.by_ino.get(st.ino) if st.ino else self._by_staged.get(st.sid)
            if known is not None and known.ino in self.by_ino:
                if known.staged is not st:  # (opened for writing a moment ago: the open's inode)
                    known.staged, known.token = st, ("w", st.sid)
                    self._by_staged[st.sid] = known
                if known.path and self.by_path.get(known.path) is known and known.path != path:
                    del self.by_path[known.path]
                known.path, known.parent, known.name, known.attr = path, parent, name, res.attr
                known.gen += 1
                self.by_path[path] = known
                return known
        node = Node(next(self._inos), parent, name, path, res.token, res.attr, res.immutable, res.staged)
        self.by_ino[node.ino] = node
        self.by_path[path] = node
        if res.staged is not None:
            self._by_staged[res.staged.sid] = node
            if not res.staged.ino:
                res.staged.ino = node.ino
        return node

    @staticmethod
    def _same(node: Node, res: Resolved) -> bool:
        if node.token == res.token:
            return True
        s = node.staged
        if s is not None and res.token[0] == "f" and not s.dirty and s.durable is not None \
                and s.durable.manifest == res.token[1]:
            # written through this inode, stored, and no longer being written: the inode keeps
            # what was written (the kernel may hold it in its cache: the same bytes)
            node.token, node.staged, node.immutable = res.token, None, res.immutable
            node.gen += 1
            node.drop_cache = True  # (direct writes bypass the cache: drop what it may hold)
            return True
        return False

    def forget(self, ino: int, n: int) -> None:
        with self._lock:
            node = self.by_ino.get(ino)
            if node is None or ino == ROOT_INO:
                return
            node.nlookup -= n
            if node.nlookup <= 0 and not node.opens:
                self._drop(node)

    def _drop(self, node: Node) -> None:
        del self.by_ino[node.ino]
        if node.path and self.by_path.get(node.path) is node:
            del self.by_path[node.path]
        for sid, n in list(self._by_staged.items()):
            if n is node:
                del self._by_staged[sid]

    def attach(self, parent: int, name: str, res: Resolved) -> Node:
        """A node made by a request that creates (create, mkdir): counted like a lookup."""
        path = self.child_path(parent, name)
        with self._lock:
            node = self._current(path, res, parent, name)
            node.nlookup += 1
            node.looked_up = self.clock()
            return node

    # ---------------------------------------------------------------- state of a node
    def attr(self, ino: int) -> Attr:
        """``getattr``: a current node's attributes now; a stale (detached or superseded) node keeps
        those of its own version (it is what an ``fstat`` of an old handle must see)."""
        node = self.get(ino)
        if node.staged is not None and (node.staged.handles > 0 or not node.path):
            return self.view._staged_attr(node.staged)
        if not node.path or node.immutable and not node.follows_ref:
            return node.attr
        gen = node.gen
        try:
            res = self.view.resolve(node.path)
        except CoralError:
            return node.attr
        with self._lock:
            if node.gen != gen:  # changed here meanwhile: what was resolved is void
                return self.view._staged_attr(node.staged) if node.staged is not None else node.attr
            if self.by_path.get(node.path) is node and self._same(node, res):
                node.attr = res.attr
            elif node.path:
                self._mark_stale(node)
        return node.attr

    def check_current(self, node: Node) -> None:
        """Before an open: refuse (ESTALE) a node whose path shows another version now, unless the
        kernel has just looked it up (see LOOKUP_GRACE)."""
        if node.staged is not None and node.staged.handles > 0 or not node.follows_ref:
            return
        if not node.path:
            raise StaleNode(f"inode {node.ino}: removed")
        gen = node.gen
        try:
            res = self.view.resolve(node.path)
        except PathNotFound:
            res = None
        with self._lock:
            if node.gen != gen:
                return  # changed here meanwhile (by a request on this inode): it is current
            if res is not None and self.by_path.get(node.path) is node and self._same(node, res):
                node.attr = res.attr
                return
            if self.clock() - node.looked_up < LOOKUP_GRACE:
                return  # the version it was looked up at a moment ago: as good as current
            self._mark_stale(node)
        raise StaleNode(f"{node.path}: changed since it was looked up")

    def _mark_stale(self, node: Node) -> None:
        """Detach ``node`` from its path and remember to drop the kernel's entry (caller locks)."""
        if node.path and self.by_path.get(node.path) is node:
            del self.by_path[node.path]
        if node.path:
            self._stale.append((node.parent, node.name))
        node.path = ""
        node.gen += 1

    def opened(self, node: Node, fh: int, staged: Staged | None) -> None:
        with self._lock:
            node.opens.add(fh)
            if staged is not None and node.staged is not staged:
                node.staged = staged  # written in place: the inode's content is the staged file's
                node.token = ("w", staged.sid)
                node.gen += 1
            if staged is not None:
                self._by_staged[staged.sid] = node

    def released(self, ino: int, fh: int) -> None:
        with self._lock:
            node = self.by_ino.get(ino)
            if node is None:
                return
            node.opens.discard(fh)
            if node.nlookup <= 0 and not node.opens:
                self._drop(node)

    def changed_here(self, node: Node) -> None:
        """The file was changed in place by a request on this very inode (truncate(2) by name):
        the inode takes what its path shows now, and its cached pages are dropped at the next
        open."""
        if not node.path:
            return
        res = self.view.resolve(node.path)
        with self._lock:
            if self.by_path.get(node.path) is node:
                node.token, node.attr, node.staged, node.immutable = res.token, res.attr, res.staged, res.immutable
                node.drop_cache = True
                node.gen += 1

    # ---------------------------------------------------------------- namespace changes made here
    def moved(self, old: str, new: str) -> None:
        """After a rename inside a branch: the nodes at ``old`` (and below) now live at ``new``."""
        with self._lock:
            replaced = self.by_path.get(new)
            if replaced is not None:
                replaced.path = ""
                replaced.gen += 1
                del self.by_path[new]
            moves = [(p, n) for p, n in self.by_path.items() if p == old or p.startswith(old + "/")]
            for p, _n in moves:
                del self.by_path[p]
            for p, n in moves:
                q = new + p[len(old):]
                n.path = q
                n.gen += 1
                if p == old:
                    n.name = q.rsplit("/", 1)[1]
                    parent = self.by_path.get(q.rsplit("/", 1)[0] or "/")
                    if parent is not None:
                        n.parent = parent.ino
                self.by_path[q] = n

    def removed(self, path: str) -> None:
        """After unlink/rmdir: the node keeps serving its open handles, under no name."""
        with self._lock:
            node = self.by_path.pop(path, None)
            if node is not None:
                node.path = ""
                node.gen += 1

    # ---------------------------------------------------------------- what changed elsewhere
    def has_stale(self) -> bool:
        return bool(self._stale)

    def take_stale(self) -> list[tuple[int, str]]:
        with self._lock:
            out, self._stale = self._stale, []
        return out

    def revalidate(self) -> tuple[list[tuple[int, str]], list[int]]:
        """After refs moved (another process committed, a branch or tag appeared or went), or the
        mount's own view changed behind the kernel: ``(entries, inodes)`` to tell the kernel,
        the directory entries (parent inode, name) whose inode is no longer current, and the
        inodes whose attributes to drop. The first call only takes a snapshot."""
        now = self.view.read_refs()
        extra = self.view.take_invalidations()
        before, self._refs = self._refs, now
        trees: set[str] = set(extra)  # recheck these nodes and everything below them
        exact: set[str] = set()  # ... and these nodes only (directories listing refs)
        if before is not None and before != now:
            for key in set(before) | set(now):  # full ref names
                if before.get(key) == now.get(key):
                    continue
                if key.startswith(refs.BRANCH):
                    base = "/" + key[len(refs.BRANCH):]
                else:
                    base = f"/{TAGS}/" + key[len(refs.TAG):]
                trees.add(base)
                if (key in before) != (key in now):  # a ref appeared or went: its namespaces list it
                    parts = base.strip("/").split("/")
                    exact.update("/" + "/".join(parts[:i]) for i in range(1, len(parts)))
                    exact.add("/")
        stale = self.take_stale()
        if not trees and not exact:
            return stale, []
        return self._recheck(trees, exact, stale)

    def _recheck(self, trees: Iterable[str], exact: set[str], stale: list[tuple[int, str]]
                 ) -> tuple[list[tuple[int, str]], list[int]]:
        pre = tuple(q.rstrip("/") + "/" for q in set(trees))
        whole = {q.rstrip("/") or "/" for q in trees}
        with self._lock:
            nodes = [n for p, n in self.by_path.items()
                     if n.follows_ref and (p in exact or p in whole or p.startswith(pre))]
        inodes: list[int] = []
        for node in nodes:
            path, gen = node.path, node.gen
            if not path:
                continue
            try:
                res: Resolved | None = self.view.resolve(path)
            except CoralError:
                res = None
            with self._lock:
                if self.by_path.get(path) is not node or node.gen != gen:
                    continue  # changed here meanwhile: nothing the kernel does not know
                if res is not None and self._same(node, res):
                    node.attr = res.attr
                    if node.is_dir:
                        inodes.append(node.ino)
                    continue
                if node.ino == ROOT_INO:
                    continue
                self._mark_stale(node)
        return stale + self.take_stale(), inodes
