"""``coralfs mount`` / ``coralfs umount``: every branch, commit and tag as a directory (FUSE)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from coralfs import cli


def register(sub: Any) -> None:
    common = cli.common_options()

    p = sub.add_parser(
        "mount", parents=[common], help="mount a repository (FUSE): every branch, commit and tag is a directory",
        description="Mount REPO on MOUNTPOINT: MOUNTPOINT/BRANCH/ follows a branch, MOUNTPOINT/@commits/ID/ "
                    "and MOUNTPOINT/@tags/NAME/ are immutable versions (an id prefix of 4+ hex digits "
                    "resolves). Read-only for now. Runs in the background unless --foreground; the log "
                    "is REPO/.coralfs/mount.log.")
    from coralfs.fuse import add_mount_arguments  # no libfuse needed to build the parser

    add_mount_arguments(p)
    p.set_defaults(func=cmd_mount, needs_repo=False)

    p = sub.add_parser("umount", parents=[common], help="unmount a coralfs mount",
                       description="Unmount MOUNTPOINT (fusermount3 -u; a stale mount whose process died "
                                   "is detached lazily).")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--lazy", action="store_true", help="detach now even if files are still open")
    p.set_defaults(func=cmd_umount, needs_repo=False)


def cmd_mount(args: argparse.Namespace, _repo: None) -> int:
    from coralfs.fuse import mount, mount_options, repo_root

    foreground = args.foreground or args.debug
    pid = mount(args.repository, args.mountpoint, foreground=foreground, **mount_options(args, args.debug))
    if not foreground:
        cli.info(args, f"mounted {repo_root(args.repository)} on {os.path.abspath(args.mountpoint)} (pid {pid})")
    return 0


def cmd_umount(args: argparse.Namespace, _repo: None) -> int:
    from coralfs.fuse import umount

    umount(args.mountpoint, lazy=args.lazy)
    return 0
