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
    from coralfs.mount.daemon import add_mount_arguments  # no libfuse needed to build the parser

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
    from coralfs.mount.daemon import mount, mount_options, repo_root

    foreground = args.foreground or args.debug
    pid = mount(args.repository, args.mountpoint, foreground=foreground, **mount_options(args, args.debug))
    if not foreground:
        cli.info(args, f"mounted {repo_root(args.repository)} on {os.path.abspath(args.mountpoint)} (pid {pid})")
    return 0


def cmd_umount(args: argparse.Namespace, _repo: None) -> int:
    from coralfs.mount.daemon import umount

    umount(args.mountpoint, lazy=args.lazy)
    return 0


def cmd_flush_mount(args: argparse.Namespace, _repo: None) -> int:
    from coralfs.errors import CoralError, InvalidArgument
    from coralfs.mount.daemon import is_mounted, repo_root
    from coralfs.mount.writer import (
        flush_repository,
        list_conflicts,
        live_sessions,
        mount_lock_holder,
        recover_conflict,
        take_mount_lock,
    )
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
    holder = mount_lock_holder(root)  # the running writable mount, if any
    live = [s for s in live_sessions(root) if s.get("mountpoint") and is_mounted(s["mountpoint"])]
    if holder is not None and not live:
        raise CoralError(f"a writable mount of {root} is running (pid {holder.get('pid', '?')}) but its mount point "
                         f"{holder.get('mountpoint', '?')} is not mounted; unmount it or stop that process")
    results: list[dict[str, object]] = []
    if live:  # the running mount commits (it holds the files being written)
        with Repository(root) as repo:
            before = repo.branches()
        for s in live:
            targets = [os.path.join(s["mountpoint"], b) for b in args.branches] or [s["mountpoint"]]
            for t in targets:
                try:
                    fd = os.open(t, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                except OSError as e:
                    raise CoralError(f"the mount on {s['mountpoint']} could not commit {t}: {e.strerror} "
                                     f"(see {os.path.join(root, '.coralfs', 'mount.log')})") from None
        with Repository(root) as repo:
            after = repo.branches()
            for b in sorted(after):
                if before.get(b) != after[b] and (not args.branches or b in args.branches):
                    msg = repo.get_commit(after[b]).message.splitlines()[0]
                    results.append({"branch": b, "commit": after[b].hex(), "message": msg})
                    if not args.json:
                        cli.info(args, f"{b}: committed {cli.short_id(after[b])} {msg} (by the mount on "
                                       f"{live[0]['mountpoint']})")
    else:
        lock = take_mount_lock(root, None)  # (no mount may start meanwhile: it would commit the same entries)
        try:
            with Repository(root) as repo:
                recovered: list[str] = []
                outcomes = flush_repository(repo, args.branches or None, recovered)
        finally:
            os.close(lock)
        for line in recovered:
            cli.info(args, line)
        for b, o in outcomes:
            results.append({"branch": b, "commit": o.commit.hex() if o.commit else None,
                            "message": o.message.splitlines()[0] if o.message else "",
                            "conflict": o.conflict_id})
            if args.json:
                continue
            if o.commit:
                cli.info(args, f"{b}: committed {cli.short_id(o.commit)} {o.message.splitlines()[0]}")
            if o.conflicts:
                cli.out(f"{b}: refused, {', '.join(o.conflicts)} {o.reason}; kept as conflict {o.conflict_id}")
    if args.json:
        cli.print_json(results)
    elif not results:
        cli.info(args, "nothing pending")
    return 0

