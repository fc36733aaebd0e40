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
                    "resolves). Branch directories are writable: files written there are stored when "
                    "closed and committed after --commit-delay seconds of quiet (fsync of the branch "
                    "directory, or `coralfs flush-mount`, commits at once); mkdir NAME at the top level "
                    "creates a branch. Runs in the background unless --foreground; the log is "
                    "REPO/.coralfs/mount.log.")
    from coralfs.mount.options import add_mount_arguments  # cheap: no libfuse, no numpy

    add_mount_arguments(p)
    p.set_defaults(func=cmd_mount, needs_repo=False)

    p = sub.add_parser(
        "flush-mount", parents=[common], help="commit the mount's pending changes now",
        description="Commit what was written through a mount of REPO and not committed yet (all branches, "
                    "or the BRANCHes named). With a mount running, it is asked to commit (fsync of the "
                    "branch directory); otherwise the pending entries are committed here (after a crash: "
                    "what a dead mount left; files it was still writing are discarded). --conflicts lists "
                    "changes refused because the branch had moved underneath; --recover ID --to-branch NAME "
                    "commits one such set on a new branch made at the version it was based on.")
    p.add_argument("repository", metavar="REPO")
    p.add_argument("branches", nargs="*", metavar="BRANCH")
    p.add_argument("--conflicts", action="store_true", help="list refused (conflicting) mount changes")
    p.add_argument("--recover", metavar="ID", help="commit the refused changes ID on a new branch (--to-branch)")
    p.add_argument("--to-branch", metavar="NAME", help="the branch --recover creates")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_flush_mount, needs_repo=False)

    p = sub.add_parser("umount", parents=[common], help="unmount a coralfs mount",
                       description="Unmount MOUNTPOINT (fusermount3 -u; a stale mount whose process died "
                                   "is detached lazily).")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--lazy", action="store_true", help="detach now even if files are still open")
    p.set_defaults(func=cmd_umount, needs_repo=False)


def cmd_mount(args: argparse.Namespace, _repo: None) -> int:
    from coralfs.mount.daemon import mount
    from coralfs.mount.mtab import repo_root
    from coralfs.mount.options import MountOptions

    opts = MountOptions.from_args(args)
    foreground = args.foreground or opts.debug
    pid = mount(args.repository, args.mountpoint, opts, foreground=foreground)
    if not foreground:
        cli.info(args, f"mounted {repo_root(args.repository)} on {os.path.abspath(args.mountpoint)} (pid {pid})")
    return 0


def cmd_umount(args: argparse.Namespace, _repo: None) -> int:
    from coralfs.mount.daemon import umount

    umount(args.mountpoint, lazy=args.lazy)
    return 0


def cmd_flush_mount(args: argparse.Namespace, _repo: None) -> int:
    from coralfs.errors import InvalidArgument
    from coralfs.mount.mtab import repo_root
    from coralfs.mount.pending import list_conflicts, recover_conflict
    from coralfs.mount.sessions import flush
    from coralfs.repository import Repository

    root = repo_root(args.repository)
    if args.conflicts or args.recover:
        with Repository(root) as repo:
            if args.recover:
                if not args.to_branch:
                    raise InvalidArgument("--recover needs --to-branch NAME")
                cid = recover_conflict(repo, args.recover, args.to_branch)
                cli.info(args, f"recovered mount conflict {args.recover} as {cli.short_id(cid)} on {args.to_branch}")
                return 0
            conflicts = list_conflicts(repo)
        if args.json:
            cli.print_json(conflicts)
        for cid, c in sorted(conflicts.items()):
            if not args.json:
                cli.out(f"{cid}  {c['branch']}  {len(c['files'])} file(s): {', '.join(sorted(c['files']))}"
                        f"  ({', '.join(c['conflicts'])}: {c['reason']})")
        return 0
    report = flush(root, args.branches or None)
    if args.json:
        cli.print_json([r.to_json() for r in report.results])
        return 0
    for line in report.recovered:
        cli.info(args, line)
    by = f" (by the mount on {report.mountpoint})" if report.mountpoint else ""
    for r in report.results:
        if r.commit:
            cli.info(args, f"{r.branch}: committed {cli.short_id(r.commit)} {r.message}{by}")
        if r.conflicts:
            cli.out(f"{r.branch}: refused, {', '.join(r.conflicts)} {r.reason}; kept as conflict {r.conflict}")
    if not report.results:
        cli.info(args, "nothing pending")
    return 0
