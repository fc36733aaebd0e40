"""Ref commands: branch, tag, checkout."""

from __future__ import annotations

import argparse
import fnmatch
from typing import Any

from coralfs import cli
from coralfs.errors import InvalidArgument


def register(sub: Any) -> None:
    common = cli.common_options()

    p = sub.add_parser("branch", parents=[common], help="list, create or delete branches",
                       description="Without NAME: list branches (current marked with '*'). "
                                   "With NAME: create it at REV (default HEAD). -d NAME: delete it.")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("rev", nargs="?", metavar="REV")
    p.add_argument("-d", "--delete", action="store_true", help="delete branch NAME")
    p.add_argument("-f", "--force", action="store_true", help="move NAME if it already exists")
    p.add_argument("--json", action="store_true", help="machine-readable list")
    p.set_defaults(func=cmd_branch)

    p = sub.add_parser("tag", parents=[common], help="list, create or delete tags",
                       description="Without NAME (or with -l [PATTERN]): list tags with their metrics. "
                                   "With NAME: tag REV (default HEAD). -d NAME: delete it.")
    p.add_argument("name", nargs="?", metavar="NAME")
    p.add_argument("rev", nargs="?", metavar="REV")
    p.add_argument("-l", "--list", action="store_true", help="list tags (NAME is then a glob pattern)")
    p.add_argument("-d", "--delete", action="store_true", help="delete tag NAME")
    p.add_argument("-m", "--message", default="")
    p.add_argument("--metric", action="append", metavar="KEY=NUMBER", help="a metric to record (repeatable)")
    p.add_argument("--meta", action="append", metavar="KEY=VALUE", help="metadata to record (repeatable)")
    p.add_argument("-f", "--force", action="store_true", help="replace an existing tag")
    p.add_argument("--json", action="store_true", help="machine-readable list")
    p.set_defaults(func=cmd_tag)

    p = sub.add_parser("checkout", parents=[common], help="switch branches or restore a version",
                       description="Make the work tree match REV byte for byte. A branch name attaches "
                                   "HEAD to it; anything else (tag, id, HEAD~N) detaches HEAD.")
    p.add_argument("rev", metavar="REV", nargs="?")
    p.add_argument("-f", "--force", action="store_true", help="discard uncommitted changes")
    p.add_argument("-b", dest="new_branch", metavar="NAME", help="create branch NAME at REV and switch to it")
    p.set_defaults(func=cmd_checkout)


# ------------------------------------------------------------------ branch
def cmd_branch(args: argparse.Namespace, repo: Any) -> int:
    if args.delete:
        if not args.name or args.rev:
            raise InvalidArgument("usage: coralfs branch -d NAME")
        cid = repo.branch_head(args.name)
        repo.delete_branch(args.name)
        cli.info(args, f"Deleted branch {args.name} (was {cli.short_id(cid)})")
        return 0
    if args.name:
        if args.json:
            raise InvalidArgument("--json only applies to listing branches")
        cid = repo.create_branch(args.name, args.rev or "HEAD", force=args.force)
        cli.info(args, f"Created branch {args.name} at {cli.short_id(cid)}")
        return 0
    current = repo.current_branch()
    branches = sorted(repo.branches().items())
    if args.json:
        cli.print_json([{"name": n, "commit": c.hex(), "current": n == current} for n, c in branches])
        return 0
    if current is None and repo.head() is not None:
        cli.out(f"* (HEAD detached at {cli.short_id(repo.head())})")
    width = max((len(n) for n, _ in branches), default=0)
    for name, cid in branches:
        msg = repo.get_commit(cid).message.splitlines()
        cli.out(f"{'*' if name == current else ' '} {name:<{width}}  {cli.short_id(cid)}  {msg[0] if msg else ''}")
    return 0


# ------------------------------------------------------------------ tag
def tag_json(name: str, tag: Any) -> dict[str, Any]:
    return {"name": name, "commit": tag.commit.hex(), "tagger": tag.tagger, "time": tag.time,
            "date": cli.iso_time(tag.time), "message": tag.message, "metrics": tag.metrics, "meta": tag.meta}


def cmd_tag(args: argparse.Namespace, repo: Any) -> int:
    if args.delete:
        if not args.name or args.rev:
            raise InvalidArgument("usage: coralfs tag -d NAME")
        repo.delete_tag(args.name)
        cli.info(args, f"Deleted tag {args.name}")
        return 0
    if args.list or not args.name:
        if args.rev:
            raise InvalidArgument("usage: coralfs tag -l [PATTERN]")
        pattern = args.name or "*"
        tags = sorted((n, t) for n, t in repo.tags().items() if fnmatch.fnmatchcase(n, pattern))
        if args.json:
            cli.print_json([tag_json(n, t) for n, t in tags])
            return 0
        width = max((len(n) for n, _ in tags), default=0)
        for name, t in tags:
            parts = [f"{name:<{width}}", cli.short_id(t.commit)]
            if t.metrics:
                parts.append(cli.format_metrics(t.metrics))
            if t.message:
                parts.append(t.message.splitlines()[0])
            cli.out("  ".join(parts))
        return 0
    if args.json:
        raise InvalidArgument("--json only applies to listing tags")
    tag = repo.tag(args.name, args.rev or "HEAD", message=args.message, metrics=cli.parse_metrics(args.metric),
                   meta=cli.parse_meta(args.meta), force=args.force)
    cli.info(args, f"Tagged {cli.short_id(tag.commit)} as {tag.name}")
    return 0


# ------------------------------------------------------------------ checkout
def cmd_checkout(args: argparse.Namespace, repo: Any) -> int:
    if args.new_branch:
        cid = repo.create_branch(args.new_branch, args.rev or "HEAD")
        cli.info(args, f"Created branch {args.new_branch} at {cli.short_id(cid)}")
        rev = args.new_branch
    elif not args.rev:
        raise InvalidArgument("usage: coralfs checkout [-f] REV  or  coralfs checkout -b NAME [REV]")
    else:
        rev = args.rev
    with cli.progress(args, "checking out") as prog:
        cid = repo.checkout(rev, force=args.force, progress=prog)
    branch = repo.current_branch()
    if branch is not None:
        cli.info(args, f"Switched to branch '{branch}' ({cli.short_id(cid)})")
    else:
        msg = repo.get_commit(cid).message.splitlines()
        cli.info(args, f"HEAD is now at {cli.short_id(cid)} (detached) {msg[0] if msg else ''}".rstrip())
    return 0
