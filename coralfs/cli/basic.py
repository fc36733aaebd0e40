"""Everyday commands: init, add, rm, commit, status, log, show."""

from __future__ import annotations

import argparse
import os
from typing import Any

from coralfs import cli
from coralfs.errors import InvalidArgument, NothingToCommit, UnknownRevision


def register(sub: Any) -> None:
    common = cli.common_options()

    p = sub.add_parser("init", parents=[common], help="create a repository",
                       description="Create a repository in PATH (default: -R PATH, else the current directory).")
    p.add_argument("path", nargs="?", help="directory to create the repository in")
    p.add_argument("-b", "--branch", default="main", help="name of the first branch (default: main)")
    p.set_defaults(func=cmd_init, needs_repo=False)

    p = sub.add_parser("add", parents=[common], help="stage files (directories recursively)")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("rm", parents=[common], help="stage the removal of tracked files")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--cached", action="store_true", help="keep the files in the work tree")
    p.set_defaults(func=cmd_rm)

    p = sub.add_parser("commit", parents=[common], help="record the staged changes")
    p.add_argument("-m", "--message", required=True)
    p.add_argument("--metric", action="append", metavar="KEY=NUMBER", help="a metric to record (repeatable)")
    p.add_argument("--meta", action="append", metavar="KEY=VALUE", help="metadata to record (repeatable)")
    p.add_argument("--author", help="default: $CORALFS_AUTHOR, else user@host")
    p.add_argument("--allow-empty", action="store_true", help="commit even if nothing changed")
    p.set_defaults(func=cmd_commit)

    p = sub.add_parser("status", parents=[common], help="show staged, modified and untracked files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("log", parents=[common], help="show commit history")
    p.add_argument("rev", nargs="?", default="HEAD", metavar="REV")
    p.add_argument("-n", "--max-count", type=int, metavar="N", help="show at most N commits")
    p.add_argument("--oneline", action="store_true", help="one line per commit")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--metric", metavar="NAME", help="only commits that carry this metric (with --best: the best one)")
    p.add_argument("--best", choices=("max", "min"), help="with --metric: show the commit with the best value")
    p.set_defaults(func=cmd_log)

    p = sub.add_parser("show", parents=[common], help="show a commit (or tag) and its files")
    p.add_argument("rev", nargs="?", default="HEAD", metavar="REV")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_show)


# ------------------------------------------------------------------ init / add / rm / commit
def cmd_init(args: argparse.Namespace, _repo: None) -> int:
    from coralfs.repository import Repository

    path = args.path or args.repo or "."
    with Repository.init(path, default_branch=args.branch) as repo:
        cli.info(args, f"Initialized empty coralfs repository in {os.path.join(repo.root, '.coralfs')}")
    return 0


def cmd_add(args: argparse.Namespace, repo: Any) -> int:
    paths = cli.worktree_paths(repo, args.paths)
    with cli.progress(args, "adding") as prog:
        stats = repo.add(paths, progress=prog,
                         on_skip=lambda path, why: cli.warn(f"skipped {path}: {why}"))
    if stats.logical:
        cli.info(args, f"ingested {cli.human_size(stats.logical)} in {stats.chunks} chunks "
                       f"({stats.new_chunks} new, {stats.dedup_chunks} deduplicated, {stats.delta_chunks} delta), "
                       f"stored {cli.human_size(stats.stored)}")
    return 0


def cmd_rm(args: argparse.Namespace, repo: Any) -> int:
    for path in repo.rm(cli.worktree_paths(repo, args.paths), cached=args.cached):
        cli.info(args, f"rm {path}")
    return 0


def cmd_commit(args: argparse.Namespace, repo: Any) -> int:
    metrics = cli.parse_metrics(args.metric)
    meta = cli.parse_meta(args.meta)
    if not args.message.strip():
        raise InvalidArgument("empty commit message")
    try:
        cid = repo.commit(args.message, metrics=metrics, meta=meta, author=args.author,
                          allow_empty=args.allow_empty)
    except NothingToCommit:
        st = repo.status()
        hint = " (use 'coralfs add' to stage changes)" if st.modified or st.deleted or st.untracked else ""
        raise NothingToCommit(f"nothing to commit{hint}") from None
    where = repo.current_branch() or "detached HEAD"
    c = repo.get_commit(cid)
    suffix = f" [{cli.format_metrics(c.metrics)}]" if c.metrics else ""
    cli.info(args, f"[{where} {cli.short_id(cid)}] {c.message.splitlines()[0] if c.message else ''}{suffix}")
    return 0


# ------------------------------------------------------------------ status
def cmd_status(args: argparse.Namespace, repo: Any) -> int:
    st = repo.status()
    if args.json:
        cli.print_json(st.to_json())
        return 0
    if st.branch is not None:
        cli.out(f"On branch {st.branch}")
    else:
        cli.out(f"HEAD detached at {cli.short_id(st.head)}")
    if st.head is None:
        cli.out("\nNo commits yet")
    if st.staged:
        cli.out("\nChanges to be committed:")
        for path, what in sorted(st.staged.items()):
            cli.out(f"\t{what + ':':<10} {path}")
    if st.modified or st.deleted:
        cli.out("\nChanges not staged for commit:")
        for path in sorted(st.modified):
            cli.out(f"\t{'modified:':<10} {path}")
        for path in sorted(st.deleted):
            cli.out(f"\t{'deleted:':<10} {path}")
    if st.untracked:
        cli.out("\nUntracked files:")
        for path in sorted(st.untracked):
            cli.out(f"\t{path}")
    if st.clean and not st.untracked:
        cli.out("\nnothing to commit, working tree clean")
    elif not st.staged:
        cli.out("\nnothing staged to commit (use 'coralfs add')")
    return 0


# ------------------------------------------------------------------ log / show
def decorations(repo: Any) -> dict[bytes, list[str]]:
    """commit id -> ['HEAD -> main', 'tag: v1', ...] for log/show."""
    deco: dict[bytes, list[str]] = {}
    branch, head = repo.current_branch(), repo.head()
    for name, cid in sorted(repo.branches().items()):
        deco.setdefault(cid, []).append(f"HEAD -> {name}" if name == branch else name)
    if branch is None and head is not None:
        deco.setdefault(head, []).insert(0, "HEAD")
    for name, tag in sorted(repo.tags().items()):
        deco.setdefault(tag.commit, []).append(f"tag: {name}")
    for names in deco.values():  # 'HEAD -> x' first
        names.sort(key=lambda s: not s.startswith("HEAD"))
    return deco


def commit_json(cid: bytes, c: Any, refs: list[str] | None = None) -> dict[str, Any]:
    d = {"id": cid.hex(), "parents": [p.hex() for p in c.parents], "tree": c.tree.hex(), "author": c.author,
         "time": c.time, "date": cli.iso_time(c.time), "message": c.message, "metrics": c.metrics,
         "meta": c.meta}
    if refs is not None:
        d["refs"] = refs
    return d


def _print_commit_header(cid: bytes, c: Any, refs: list[str], full_parents: bool = False) -> None:
    deco = f" ({', '.join(refs)})" if refs else ""
    cli.out(f"commit {cid.hex()}{deco}")
    if full_parents:
        for p in c.parents:
            cli.out(f"Parent: {p.hex()}")
    elif len(c.parents) > 1:
        cli.out("Merge:  " + " ".join(cli.short_id(p) for p in c.parents))
    cli.out(f"Author: {c.author}")
    cli.out(f"Date:   {cli.format_time(c.time)}")
    if c.metrics:
        cli.out(f"Metrics: {cli.format_metrics(c.metrics)}")
    if c.meta:
        cli.out("Meta:   " + ", ".join(f"{k}={v}" for k, v in sorted(c.meta.items())))
    cli.out()
    for line in (c.message or "").splitlines() or [""]:
        cli.out(f"    {line}")


def cmd_log(args: argparse.Namespace, repo: Any) -> int:
    if args.max_count is not None and args.max_count < 0:
        raise InvalidArgument("-n must be >= 0")
    if args.best and not args.metric:
        raise InvalidArgument("--best needs --metric NAME")
    if args.metric and args.best:
        from coralfs.diff import best_commit

        best = best_commit(repo, args.metric, args.best, args.rev)
        if best is None:
            raise UnknownRevision(f"no commit reachable from {args.rev} has metric {args.metric!r}")
        entries = [(best.commit_id, best.commit)]
    else:
        entries = repo.log(args.rev, n=None if args.metric else args.max_count) if args.max_count != 0 else []
        if args.metric:
            entries = [(cid, c) for cid, c in entries if args.metric in c.metrics][: args.max_count]
    deco = decorations(repo)
    if args.json:
        cli.print_json([commit_json(cid, c, deco.get(cid, [])) for cid, c in entries])
        return 0
    for i, (cid, c) in enumerate(entries):
        refs = deco.get(cid, [])
        if args.oneline:
            d = f" ({', '.join(refs)})" if refs else ""
            m = f" [{cli.format_metrics(c.metrics)}]" if c.metrics else ""
            first = c.message.splitlines()[0] if c.message else ""
            cli.out(f"{cli.short_id(cid)}{d} {first}{m}")
        else:
            if i:
                cli.out()
            _print_commit_header(cid, c, refs)
    return 0


def cmd_show(args: argparse.Namespace, repo: Any) -> int:
    tags = repo.tags()
    tag = tags.get(args.rev) if args.rev not in repo.branches() else None
    cid = repo.resolve(args.rev)
    c = repo.get_commit(cid)
    tree = repo.get_tree(c.tree)
    refs = decorations(repo).get(cid, [])
    if args.json:
        d = commit_json(cid, c, refs)
        changes = _changes(repo, c, tree)
        d["files"] = [{"path": p, "size": e.size, "mode": e.mode, "manifest": e.manifest.hex(),
                       "change": changes.get(p)} for p, e in sorted(tree.entries.items())]
        d["deleted"] = sorted(k for k, v in changes.items() if v == "D")
        if tag is not None:
            d["tag"] = {"name": tag.name, "tagger": tag.tagger, "time": tag.time, "date": cli.iso_time(tag.time),
                        "message": tag.message, "metrics": tag.metrics, "meta": tag.meta}
        cli.print_json(d)
        return 0
    if tag is not None:
        cli.out(f"tag {tag.name}")
        cli.out(f"Tagger: {tag.tagger}")
        cli.out(f"Date:   {cli.format_time(tag.time)}")
        if tag.metrics:
            cli.out(f"Metrics: {cli.format_metrics(tag.metrics)}")
        if tag.meta:
            cli.out("Meta:   " + ", ".join(f"{k}={v}" for k, v in sorted(tag.meta.items())))
        if tag.message:
            cli.out()
            for line in tag.message.splitlines():
                cli.out(f"    {line}")
        cli.out()
    _print_commit_header(cid, c, refs, full_parents=True)
    total = sum(e.size for e in tree.entries.values())
    changes = _changes(repo, c, tree)
    cli.out()
    cli.out(f"Files ({len(tree.entries)}, {cli.human_size(total)}; A added, M modified, D deleted"
            f"{' vs first parent' if c.parents else ''}):")
    for p, e in sorted(tree.entries.items()):
        cli.out(f"{changes.get(p, ' ')} {cli.human_size(e.size):>10}  {p}")
    for p in sorted(k for k, v in changes.items() if v == "D"):
        cli.out(f"D {'':>10}  {p}")
    return 0


def _changes(repo: Any, c: Any, tree: Any) -> dict[str, str]:
    """path -> 'A'/'M'/'D' relative to the first parent."""
    old = repo.get_tree(repo.get_commit(c.parents[0]).tree).entries if c.parents else {}
    ch = {p: "A" if p not in old else "M" for p, e in tree.entries.items() if old.get(p) != e}
    ch.update({p: "D" for p in old if p not in tree.entries})
    return ch
