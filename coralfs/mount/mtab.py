"""Where things are: a repository's root and mount log, and the kernel's mount table."""

from __future__ import annotations

import os

from coralfs.repository import CORAL_DIR, repo_root

LOG_NAME = "mount.log"


def log_path(repo: str | os.PathLike[str]) -> str:
    return os.path.join(repo_root(repo), CORAL_DIR, LOG_NAME)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync of a directory: on a branch directory of a mount, "commit its changes now"."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unescape_mount_field(s: str) -> str:
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 3 < len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mounts() -> dict[str, str]:
    """Mount point -> filesystem type, from /proc/self/mountinfo (stale FUSE mounts included)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                pre, _, post = line.partition(" - ")
                fields = pre.split()
                if len(fields) >= 5:
                    out[_unescape_mount_field(fields[4])] = post.split()[0] if post else ""
    except OSError:
        pass
    return out


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    return os.path.abspath(os.fspath(mountpoint)) in mounts()
