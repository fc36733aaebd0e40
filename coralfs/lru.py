"""The one least-recently-used cache (decoded chunks, objects, the mount's commits and file views).

Bounded by the number of entries, by the total size of the values, or both; thread-safe (one
lock, held only for dictionary operations). Values are never None: ``get`` returns None for
a miss.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRU(Generic[K, V]):
    """At most ``max_items`` entries and ``max_bytes`` of values (``sizeof``, default ``len``),
    the least recently used dropped first; a value larger than ``max_value_bytes`` is not kept.
    ``size``: the values' total size (0 when there is no ``max_bytes``: sizes are then not taken)."""

    def __init__(self, max_items: int | None = None, max_bytes: int | None = None, *,
                 max_value_bytes: int | None = None, sizeof: Callable[[V], int] = len) -> None:  # type: ignore[assignment]
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.max_value_bytes = max_value_bytes
        self.size = 0
        self._sizeof = sizeof
        self._d: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value (now the most recently used), or None."""
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is cached (its place in the order does not change)."""
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def put(self, key: K, value: V) -> None:
        """Cache ``value`` as the most recently used; drop the least recently used beyond the bounds."""
        sized = self.max_bytes is not None
        n = self._sizeof(value) if sized or self.max_value_bytes is not None else 0
        if self.max_value_bytes is not None and n > self.max_value_bytes:
            return
        d = self._d
        with self._lock:
            old = d.pop(key, None)
            d[key] = value
            if sized:
                self.size += n - (self._sizeof(old) if old is not None else 0)
            while (sized and self.size > self.max_bytes  # type: ignore[operator]
                   or self.max_items is not None and len(d) > self.max_items):
                _, v = d.popitem(last=False)
                if sized:
                    self.size -= self._sizeof(v)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.size = 0
