"""The mount's options, spelled once: a dataclass, its command-line flags, and the daemon's
argv (which must round-trip through the flags). Importing this stays cheap (``coralfs
--help`` builds the ``mount`` parser from it).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields, replace
from typing import Any

from coralfs.errors import InvalidArgument

COMMIT_DELAY = 1.5  # seconds of quiet before a branch's written files are committed
ATTR_TIMEOUT = 3600.0  # seconds; names that move are invalidated explicitly
REFRESH_INTERVAL = 0.2  # seconds between ref polls
READAHEAD_KB = 1024  # 8x the kernel default; more only over-reads (and decodes) around mmap faults


@dataclass(frozen=True)
class MountOptions:
    """How a repository is mounted (``coralfs mount`` flags; ``mount(..., options)``)."""

    read_only: bool = False
    commit_delay: float = COMMIT_DELAY
    allow_other: bool = False
    allow_other_write: bool = False
    direct_io: bool = False
    debug: bool = False
    attr_timeout: float = ATTR_TIMEOUT
    refresh_interval: float = REFRESH_INTERVAL
    readahead_kb: int | None = READAHEAD_KB  # None (or 0 on the command line): the kernel's default
    blksize: int | None = None  # st_blksize shown (None: the view's default, 1 MiB)
    prefetch_mb: int | None = None  # decode-ahead window of sequential readers (None: the default)
    max_idle_threads: int = 16

    def __post_init__(self) -> None:
        if self.allow_other_write and not self.allow_other:
            raise InvalidArgument("--allow-other-write needs --allow-other")
        if self.commit_delay < 0:
            raise InvalidArgument("--commit-delay must be >= 0")

    def with_(self, **changes: Any) -> MountOptions:
        return replace(self, **changes)

    def fuse_options(self) -> list[str]:
        """libfuse's ``-o`` options: other users get the modes shown checked by the kernel."""
        out = ["fsname=coralfs", "subtype=coralfs", "noatime"]
        if self.allow_other:
            out += ["allow_other", "default_permissions"]
        return out

    # -- the command line: one table for the flags, the parser and the daemon's argv ----------
    @classmethod
    def add_arguments(cls, p: argparse.ArgumentParser) -> None:
        for name, flag, kind, help_ in _FLAGS:
            default = _DEFAULTS[name]
            if kind is bool:
                p.add_argument(flag, dest=name, action="store_true", help=help_ or argparse.SUPPRESS)
            else:
                p.add_argument(flag, dest=name, type=kind, default=default, help=help_ or argparse.SUPPRESS,
                               metavar=flag.strip("-").upper().replace("-", "_") if help_ else None)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MountOptions:
        values = {name: getattr(args, name) for name, *_ in _FLAGS}
        if values.get("readahead_kb") == 0:
            values["readahead_kb"] = None
        return cls(**values)

    def to_argv(self) -> list[str]:
        """The flags that make ``from_args`` give these options back (the daemon's command line)."""
        out: list[str] = []
        for name, flag, kind, _ in _FLAGS:
            v = getattr(self, name)
            if kind is bool:
                if v:
                    out.append(flag)
            elif v != _DEFAULTS[name] or name == "readahead_kb":
                out.append(f"{flag}={0 if v is None else v}")
        return out


def add_mount_arguments(p: argparse.ArgumentParser) -> None:
    """``coralfs mount`` / ``python -m coralfs.mount.daemon``: REPO MOUNTPOINT [-f] and the options."""
    p.add_argument("repository", metavar="REPO", help="the repository to mount")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground until unmounted")
    MountOptions.add_arguments(p)


_DEFAULTS = {f.name: f.default for f in fields(MountOptions)}
# (field, flag, type, help: None hides a flag meant for benchmarks and tests)
_FLAGS: list[tuple[str, str, Any, str | None]] = [
    ("read_only", "--read-only", bool, "refuse every write (EROFS)"),
    ("commit_delay", "--commit-delay", float,
     f"commit a branch's written files after this long without writes (default: {COMMIT_DELAY:g}); "
     "fsync of the branch directory commits at once"),
    ("allow_other", "--allow-other", bool,
     "let other users read the mount (the kernel checks the modes shown: files belong to the mount's owner, "
     "writable by the owner only)"),
    ("allow_other_write", "--allow-other-write", bool, "with --allow-other: let other users write too "
     "(commits name who wrote)"),
    ("direct_io", "--direct-io", bool, "bypass the kernel page cache (one-shot streaming; breaks shared mmap)"),
    ("debug", "--debug", bool, "log every FUSE request (implies --foreground)"),
    ("attr_timeout", "--attr-timeout", float, None),
    ("refresh_interval", "--refresh-interval", float, None),
    ("readahead_kb", "--readahead-kb", int, None),
    ("blksize", "--blksize", int, None),
    ("prefetch_mb", "--prefetch-mb", int, None),
    ("max_idle_threads", "--max-idle-threads", int, None),
]
