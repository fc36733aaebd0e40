"""Maintenance commands: prune, gc, repack, fsck, storage."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from coralfs import cli
from coralfs.errors import IntegrityError


def register(sub: Any) -> None:
    common = cli.common_options()

    p = sub.add_parser("prune", parents=[common], help="drop old checkpoints from a branch's history",
                       description="Rewrite BRANCH to keep only the newest N and the best N commits "
                                   "(by a commit metric); the head is always kept. Tags and other "
                                   "branches keep what they reference. Run `coralfs gc` afterwards "
                                   "to reclaim the space.")
    p.add_argument("branch", metavar="BRANCH")
    p.add_argument("--keep-last", type=int, metavar="N", help="keep the N newest commits")
    p.add_argument("--keep-best", type=int, metavar="N", help="keep the N best commits by --metric")
    p.add_argument("--metric", metavar="NAME", help="commit metric that ranks commits for --keep-best")
    p.add_argument("--mode", choices=("max", "min"), default="max", help="higher (max) or lower (min) is better")
    p.add_argument("-n", "--dry-run", action="store_true", help="show what would be dropped")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("gc", parents=[common], help="reclaim the space of unreachable data",
                       description="Delete chunks and objects that no ref, stage entry or pending mount "
                                   "file reaches (re-encoding live deltas whose bases go first). Waits "
                                   "for running ingests and blocks new ones while it runs; readers "
                                   "keep working.")
    p.add_argument("-n", "--dry-run", action="store_true", help="count what would be removed")
    p.add_argument("--compact", action="store_true",
                   help="then rewrite the database file without free pages (refused while another "
                        "process has the repository open)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("repack", parents=[common], help="re-encode replaced versions as reverse deltas",
                       description="Commits store each new version of a file whole and re-encode the "
                                   "version it replaced as a delta against it in the background (the "
                                   "committing process waits for that work before it exits). This "
                                   "finishes work left queued (a process killed, or "
                                   "CORALFS_AUTO_REPACK=0).")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_repack)

    p = sub.add_parser("fsck", parents=[common], help="verify the repository's integrity",
                       description="Check refs, objects, every file's content hash (through delta "
                                   "chains), every chunk and the indexes. Exit code 9 if problems remain.")
    p.add_argument("--repair", action="store_true",
                   help="fix what can be fixed losslessly (stale index entries, garbage)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_fsck)

    p = sub.add_parser("storage", parents=[common], help="database file size, page use and free pages")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_storage)


def _log(args: argparse.Namespace) -> Any:
    if getattr(args, "quiet", False) or getattr(args, "json", False):
        return None
    return lambda m: print(m, file=sys.stderr)


def cmd_prune(args: argparse.Namespace, repo: Any) -> int:
    from coralfs.prune import prune_branch

    plan = prune_branch(repo, args.branch, args.keep_last, args.keep_best, args.metric, args.mode,
                        dry_run=args.dry_run)
    if args.json:
        cli.print_json({**plan.to_json(), "dry_run": args.dry_run})
        return 0
    verb = "would drop" if args.dry_run else "dropped"
    for cid in plan.drop:
        c = repo.get_commit(cid)
        cli.info(args, f"{verb} {cli.short_id(cid)} {c.message.splitlines()[0] if c.message else ''}")
    if args.dry_run or not plan.drop:
        cli.info(args, f"{args.branch}: {len(plan.keep)} kept, {len(plan.drop)} "
                       + ("to drop" if args.dry_run else "dropped"))
    else:
        cli.info(args, f"{args.branch}: {len(plan.keep)} kept, {len(plan.drop)} dropped, "
                       f"{plan.rewritten} rewritten; head {cli.short_id(plan.head)} -> "
                       f"{cli.short_id(plan.new_head)} (run `coralfs gc` to reclaim space)")
    return 0


def cmd_gc(args: argparse.Namespace, repo: Any) -> int:
    from coralfs.gc import gc

    s = gc(repo, dry_run=args.dry_run, compact=args.compact, log=_log(args))
    if args.json:
        cli.print_json(s.to_json())
        return 0
    h = cli.human_size
    pre = "would remove" if s.dry_run else "removed"
    cli.info(args, f"{pre} {s.chunks_swept} of {s.chunks_total} chunks ({h(s.chunk_bytes_swept)}), "
                   f"{s.objects_swept} of {s.objects_total} objects ({h(s.object_bytes_swept)}), "
                   f"{s.index_swept} index entries")
    if s.reencoded:
        cli.info(args, f"{'would re-encode' if s.dry_run else 're-encoded'} {s.reencoded} chunks whose delta "
                       "bases were unreachable"
                       + ("" if s.dry_run else f" ({h(s.reencode_bytes_before)} -> {h(s.reencode_bytes_after)}, "
                                               f"{s.keyframes} keyframes)"))
    cli.info(args, f"database file: {h(s.file_bytes_before)} -> {h(s.file_bytes_after)}; "
                   f"free pages {s.free_pages_before} -> {s.free_pages_after}"
                   + (" (compacted)" if s.compacted else " (reused by later writes)"))
    for p in s.problems:
        cli.out(f"warning: {p}")
    return 0


def cmd_repack(args: argparse.Namespace, repo: Any) -> int:
    from dataclasses import asdict

    s = repo.repack()
    if args.json:
        cli.print_json(asdict(s))
        return 0
    h = cli.human_size
    cli.info(args, f"{s.examined} replaced versions: {s.demoted} re-encoded as deltas ({h(s.bytes_before)} -> "
                   f"{h(s.bytes_after)}), {s.kept} kept whole, {s.dropped} no longer needed; {s.seconds:.1f} s")
    return 0


def cmd_fsck(args: argparse.Namespace, repo: Any) -> int:
    from coralfs.fsck import fsck

    r = fsck(repo, repair=args.repair, log=_log(args))
    if args.json:
        cli.print_json(r.to_json())
    else:
        for p in r.problems:
            cli.out(f"problem: {p}")
        for fix in r.repaired:
            cli.info(args, f"repaired: {fix}")
        cli.info(args, f"checked {r.refs} refs, {r.objects} reachable objects, {r.manifests} files "
                       f"({cli.human_size(r.bytes_verified)}), {r.chunks} chunks; "
                       f"garbage: {r.garbage_chunks} chunks, {r.garbage_objects} objects")
        cli.info(args, "ok" if r.ok else f"{len(r.problems)} problems"
                 + ("" if args.repair or not any(p.repairable for p in r.problems)
                    else " (some repairable: run with --repair)"))
    return 0 if r.ok else IntegrityError.exit_code


def cmd_storage(args: argparse.Namespace, repo: Any) -> int:
    from coralfs.gc import lmdb_info

    i = lmdb_info(repo)
    if args.json:
        cli.print_json(i)
        return 0
    h = cli.human_size
    cli.out(f"database file:  {h(i['file_bytes'])} ({h(i['disk_bytes'])} on disk)")
    cli.out(f"pages:          {i['pages_high_water']} x {i['page_size']} B; {i['pages_used']} in use, "
            f"{i['free_pages']} free ({h(i['free_bytes'])}, reused before the file grows)")
    cli.out(f"readers:        {i['reader_slots']} slots, pids {', '.join(map(str, i['reader_pids'])) or '-'}")
    cli.out(f"{'database':<10} {'entries':>9} {'size':>10}")
    for name, d in i["databases"].items():
        cli.out(f"{name:<10} {d['entries']:>9} {h(d['bytes']):>10}")
    return 0
