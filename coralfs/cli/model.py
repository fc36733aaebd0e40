"""Model-aware commands: diff, merge, best, export, import."""

from __future__ import annotations

import argparse
import math
import os
from typing import Any

from coralfs import cli
from coralfs.errors import InvalidArgument, UnknownRevision


def register(sub: Any) -> None:
    common = cli.common_options()

    p = sub.add_parser("diff", parents=[common], help="compare two revisions, tensor by tensor",
                       description="Compare revision A (old) with B (new), optionally only under PATHs. "
                                   "Checkpoints are compared per tensor: added, removed, dtype/shape changed, "
                                   "or changed, with the fraction of elements changed, L2 norm of the "
                                   "difference (absolute and relative), max |difference| and cosine "
                                   "similarity. Unchanged tensors are detected from chunk ids without "
                                   "decoding. torch.save files are compared per storage.")
    p.add_argument("rev_a", metavar="A")
    p.add_argument("rev_b", metavar="B")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-a", "--all", action="store_true", help="also list unchanged files and tensors")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("merge", parents=[common], help="three-way merge of a branch into the current branch",
                       description="Merge BRANCH (any revision) into the current branch against their common "
                                   "ancestor, file by file and tensor by tensor. A tensor changed on both sides "
                                   "is a conflict (the merge stops, nothing changes) unless a strategy "
                                   "resolves it. Needs a clean work tree; the work tree follows the merge.")
    p.add_argument("branch", metavar="BRANCH")
    p.add_argument("--strategy", choices=["ours", "theirs", "average", "task-arithmetic", "ties"],
                   help="how to resolve tensors changed on both sides (default: report conflicts)")
    p.add_argument("--strategy-for", action="append", default=[], metavar="PATTERN=STRATEGY",
                   help="strategy for tensor names (or file paths, ours/theirs) matching an fnmatch PATTERN; "
                        "repeatable, first match wins")
    p.add_argument("--weight", type=float, default=0.5,
                   help="average: weight of theirs, result = (1-w)*ours + w*theirs (default 0.5)")
    p.add_argument("--lambda", dest="lam", type=float, default=1.0,
                   help="task-arithmetic/ties: scale of the summed task vectors (default 1.0)")
    p.add_argument("--density", type=float, default=0.2,
                   help="ties: fraction of each task vector kept, by magnitude (default 0.2)")
    p.add_argument("-m", "--message", help="commit message (default: 'Merge BRANCH into CURRENT')")
    p.add_argument("--no-ff", action="store_true", help="create a merge commit even when a fast-forward is possible")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("best", parents=[common], help="the best commit by a metric",
                       description="The commit with the best value of METRIC among those reachable from REV "
                                   "(default HEAD; --all: from every branch and tag). Values come from commit "
                                   "metrics, or from metrics of tags on a commit.")
    p.add_argument("rev", nargs="?", default="HEAD", metavar="REV")
    p.add_argument("--metric", required=True, metavar="NAME")
    p.add_argument("--mode", "--best", dest="mode", choices=["max", "min"], default="max",
                   help="max (default) or min")
    p.add_argument("--all", action="store_true", help="consider commits reachable from any branch or tag")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_best)

    p = sub.add_parser("export", parents=[common], help="write a checkpoint in another format",
                       description="Convert REV:PATH to safetensors or a torch .pt state dict and write it to "
                                   "OUT. .pt files are read with torch's weights-only loader; nested names are "
                                   "flattened with '.'; non-tensor values go into the safetensors metadata as "
                                   "JSON strings (--strict: they are an error). Tensors are bit-identical.")
    p.add_argument("spec", metavar="[REV:]PATH")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--format", choices=["safetensors", "pt"], help="default: from OUT's extension")
    p.add_argument("--strict", action="store_true", help="fail on any non-tensor value instead of "
                                                         "storing it as metadata")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", parents=[common], help="commit a model directory in one commit",
                       description="Commit DIR (e.g. a Hugging Face model folder) as it is, in one commit on "
                                   "BRANCH (default: the current branch; a new branch starts at HEAD). Files "
                                   "are ingested from DIR directly. When BRANCH is checked out, the work tree "
                                   "must be clean and is updated afterwards (unless --no-checkout).")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("-b", "--branch", help="branch to commit on (default: the current branch)")
    p.add_argument("-m", "--message", help="commit message (default: 'Import NAME')")
    p.add_argument("--prefix", default="", help="put the files under this directory")
    p.add_argument("--delete", action="store_true", help="also delete files under PREFIX that DIR lacks")
    p.add_argument("--exclude", action="append", default=None, metavar="PATTERN",
                   help="skip files/directories matching PATTERN (repeatable; default: .git, .coralfs)")
    p.add_argument("--orphan", action="store_true", help="a new branch starts as a root commit, not at HEAD")
    p.add_argument("--no-checkout", action="store_true", help="do not update the work tree")
    p.add_argument("--metric", action="append", metavar="KEY=NUMBER", help="a metric to record (repeatable)")
    p.add_argument("--meta", action="append", metavar="KEY=VALUE", help="metadata to record (repeatable)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_import)


# ------------------------------------------------------------------ diff
def _num(v: float | None, fmt: str = ".3e") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, fmt)


def _shape(s: list[int] | None) -> str:
    return "?" if s is None else "[" + ", ".join(str(x) for x in s) + "]"


def _tensor_line(t: Any) -> str:
    if t.status == "added":
        return f"  + {t.name}  {t.dtype_b} {_shape(t.shape_b)}  added"
    if t.status == "removed":
        return f"  - {t.name}  {t.dtype_a} {_shape(t.shape_a)}  removed"
    if t.status == "dtype-changed":
        return f"  ! {t.name}  dtype {t.dtype_a} -> {t.dtype_b}  {_shape(t.shape_a)} -> {_shape(t.shape_b)}"
    if t.status == "shape-changed":
        return f"  ! {t.name}  {t.dtype_a}  shape {_shape(t.shape_a)} -> {_shape(t.shape_b)}"
    if t.status == "unchanged":
        return f"    {t.name}  {t.dtype_a} {_shape(t.shape_a)}  unchanged"
    line = (f"  ~ {t.name}  {t.dtype_a} {_shape(t.shape_a)}  changed {100 * (t.changed_fraction or 0):.2f}% "
            f"({t.changed_elements}/{t.numel})")
    if t.l2 is not None:
        line += (f"  L2 {_num(t.l2)}  rel {_num(t.rel_l2, '.2e')}  max|d| {_num(t.max_abs)}"
                 f"  cos {_num(t.cosine, '.6f')}")
    if t.note:
        line += f"  ({t.note})"
    return line


def cmd_diff(args: argparse.Namespace, repo: Any) -> int:
    from coralfs.diff import diff

    res = diff(repo, args.rev_a, args.rev_b, args.paths or None)
    if args.json:
        cli.print_json(res.to_json())
        return 0
    cli.out(f"diff {cli.short_id(res.commit_a)}..{cli.short_id(res.commit_b)}")
    letter = {"added": "A", "removed": "D", "changed": "M", "unchanged": " "}
    for f in res.files:
        if f.status == "unchanged" and not args.all:
            continue
        if f.kind == "checkpoint":
            fmt = f.format_b or f.format_a
            detail = f"{fmt}; {len(f.changed_tensors)} of {len(f.tensors)} tensors changed"
        else:
            sizes = " -> ".join(cli.human_size(s) for s in (f.size_a, f.size_b) if s is not None)
            detail = f"file, {sizes}"
        cli.out(f"{letter[f.status]} {f.path}  ({detail})")
        if f.mode_a is not None and f.mode_b is not None and f.mode_a != f.mode_b:
            cli.out(f"  mode {f.mode_a:o} -> {f.mode_b:o}")
        if f.note:
            cli.out(f"  note: {f.note}")
        if f.status in ("added", "removed") and not args.all:
            continue
        for t in f.tensors:
            if t.status != "unchanged" or args.all:
                cli.out(_tensor_line(t))
    s = res.summary()
    if not res.changed_files:
        cli.out("no differences")
    cli.out(f"{s['files_changed'] + s['files_added'] + s['files_removed']} file(s) changed "
            f"({s['files_added']} added, {s['files_removed']} removed), {s['files_unchanged']} unchanged; "
            f"{s['tensors_changed']} tensor(s) changed, {s['params_changed']:,} parameter(s) changed, "
            f"{cli.human_size(s['bytes_differ'])} differ")
    return 0


# ------------------------------------------------------------------ merge
def cmd_merge(args: argparse.Namespace, repo: Any) -> int:
    from coralfs.errors import MergeConflicts
    from coralfs.merge import MergeOptions, merge

    opts = MergeOptions(args.strategy, args.weight, args.lam, args.density,
                        tuple(MergeOptions.parse_rule(r) for r in args.strategy_for))
    branch = repo.current_branch()
    if branch is None:
        raise InvalidArgument("HEAD is detached: check out the branch to merge into")
    try:
        with cli.progress(args, "checking out") as prog:
            res = merge(repo, args.branch, branch, opts, message=args.message, fast_forward=not args.no_ff,
                        update_worktree=True, progress=prog)
    except MergeConflicts as e:
        if args.json:
            cli.print_json({"status": "conflict", "branch": branch, "conflicts": [c.to_json() for c in e.conflicts]})
        else:
            for c in e.conflicts:
                cli.out(f"CONFLICT {c}")
        raise
    if args.json:
        cli.print_json(res.to_json())
        return 0
    if res.status == "up-to-date":
        cli.info(args, "Already up to date.")
        return 0
    if res.status == "fast-forward":
        cli.info(args, f"Fast-forward {branch}: {cli.short_id(res.ours)}..{cli.short_id(res.theirs)}")
    else:
        cli.info(args, f"Merged {args.branch} into {branch}: {cli.short_id(res.commit)} "
                       f"(base {cli.short_id(res.base)})")
    for path, how in sorted(res.files.items()):
        cli.info(args, f"  {path}: {how}")
    if res.resolved:
        counts: dict[str, int] = {}
        for r in res.resolved:
            counts[r.strategy] = counts.get(r.strategy, 0) + 1
        cli.info(args, "  resolved by strategy: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    for note in res.notes:
        cli.info(args, f"  note: {note}")
    return 0


# ------------------------------------------------------------------ best
def cmd_best(args: argparse.Namespace, repo: Any) -> int:
    from coralfs.diff import best_commit

    best = best_commit(repo, args.metric, args.mode, None if args.all else args.rev)
    if best is None:
        raise UnknownRevision(f"no commit with metric {args.metric!r}"
                              + ("" if args.all else f" is reachable from {args.rev}"))
    if args.json:
        cli.print_json(best.to_json())
        return 0
    first = best.commit.message.splitlines()[0] if best.commit.message else ""
    src = "" if best.source == "commit" else f" (from {best.source})"
    cli.out(f"{cli.short_id(best.commit_id)} {args.metric}={best.value:g}{src} {first}".rstrip())
    return 0


# ------------------------------------------------------------------ export / import
def cmd_export(args: argparse.Namespace, repo: Any) -> int:
    from coralfs.export import export_file

    rev, path = repo.split_revpath(args.spec)
    res = export_file(repo, rev, path, args.out, args.format, strict=args.strict)
    if args.json:
        cli.print_json(res.to_json())
        return 0
    how = "copied" if res.copied else f"converted to {res.format}"
    cli.info(args, f"{res.source} -> {res.output}: {how}, {res.tensors} tensors, {cli.human_size(res.size)}")
    if res.metadata and res.format == "safetensors":
        cli.info(args, f"  metadata: {', '.join(sorted(res.metadata))}")
    if res.dropped_metadata:
        cli.info(args, f"  dropped safetensors metadata: {', '.join(sorted(res.dropped_metadata))}")
    return 0


def cmd_import(args: argparse.Namespace, repo: Any) -> int:
    from coralfs.export import DEFAULT_EXCLUDE, import_dir

    src = args.dir
    if not os.path.isdir(src):
        raise InvalidArgument(f"{src}: not a directory")
    with cli.progress(args, "importing") as prog:
        res = import_dir(repo, src, args.branch, args.message, args.prefix, delete=args.delete,
                         exclude=tuple(args.exclude) if args.exclude else DEFAULT_EXCLUDE, orphan=args.orphan,
                         metrics=cli.parse_metrics(args.metric), meta=cli.parse_meta(args.meta), progress=prog,
                         update_worktree=not args.no_checkout)
    for path, why in res.skipped:
        cli.warn(f"skipped {os.path.join(src, path)}: {why}")
    if args.json:
        cli.print_json(res.to_json())
        return 0
    cli.info(args, f"[{res.branch} {cli.short_id(res.commit)}] imported {src}: {len(res.added)} added, "
                   f"{len(res.modified)} modified, {len(res.unchanged)} unchanged, {len(res.deleted)} deleted; "
                   f"{cli.human_size(res.logical)} ingested, {cli.human_size(res.stored)} stored")
    return 0
