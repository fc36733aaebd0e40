"""Read-only inspection: ls, cat, stats."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from coralfs import cli
from coralfs.errors import PathNotFound

BLOCK = 4 << 20


def register(sub: Any) -> None:
    common = cli.common_options()

    p = sub.add_parser("ls", parents=[common], help="list the files of a revision",
                       description="List files of REV (default HEAD), optionally only under PATH-PREFIX.")
    p.add_argument("rev", nargs="?", default="HEAD", metavar="REV")
    p.add_argument("prefix", nargs="?", metavar="PATH-PREFIX")
    p.add_argument("-l", "--long", action="store_true", help="also show mode, manifest id and format")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("cat", parents=[common], help="write a file of a revision to stdout",
                       description="Write REV:PATH (a bare PATH means HEAD:PATH) to stdout, or to FILE with -o.")
    p.add_argument("spec", metavar="[REV:]PATH")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=cmd_cat)

    p = sub.add_parser("stats", parents=[common], help="storage statistics (dedup, compression, codecs)")
    p.add_argument("--json", action="store_true", help="raw numbers as JSON")
    p.set_defaults(func=cmd_stats)


# ------------------------------------------------------------------ ls
def cmd_ls(args: argparse.Namespace, repo: Any) -> int:
    rev, prefix = args.rev, args.prefix
    if prefix is None and ":" in rev:  # also accept `ls REV:PREFIX`
        rev, prefix = repo.split_revpath(rev)
    entries = sorted(repo.ls(rev).items())
    if prefix:
        pre = prefix.strip("/")
        entries = [(p, e) for p, e in entries if not pre or p == pre or p.startswith(pre + "/")]
        if not entries:
            raise PathNotFound(f"{prefix}: no such path in {rev}")
    fmt = {}
    if args.long or args.json:
        fmt = {p: repo.get_manifest(e.manifest).format for p, e in entries}
    if args.json:
        cli.print_json([{"path": p, "size": e.size, "mode": e.mode, "manifest": e.manifest.hex(),
                         "format": fmt[p]} for p, e in entries])
        return 0
    for p, e in entries:
        if args.long:
            cli.out(f"{e.mode:06o} {cli.short_id(e.manifest)} {fmt[p]:<12} {e.size:>14}  {p}")
        else:
            cli.out(f"{cli.human_size(e.size):>10}  {p}")
    return 0


# ------------------------------------------------------------------ cat
def cmd_cat(args: argparse.Namespace, repo: Any) -> int:
    rev, path = repo.split_revpath(args.spec)
    if args.output and args.output != "-":
        tmp = f"{args.output}.coralfs-tmp-{os.getpid()}"
        try:
            with repo.open(rev, path) as f, open(tmp, "wb") as out:
                while block := f.read(BLOCK):
                    out.write(block)
            os.replace(tmp, args.output)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return 0
    sys.stdout.flush()
    stdout = sys.stdout.buffer
    with repo.open(rev, path) as f:
        while block := f.read(BLOCK):
            stdout.write(block)
    stdout.flush()
    return 0


# ------------------------------------------------------------------ stats
def cmd_stats(args: argparse.Namespace, repo: Any) -> int:
    s = repo.stats()
    if args.json:
        cli.print_json(s)
        return 0
    h = cli.human_size
    rows = [
        ("file versions", f"{s['file_versions']}"),
        ("logical size", f"{h(s['logical_bytes'])} ({s['logical_bytes']} bytes)"),
        ("stored size", f"{h(s['stored_bytes'])} ({s['stored_bytes']} bytes, objects {h(s['object_bytes'])})"),
        ("ratio", f"{s['ratio']:.2f}x" if s["stored_bytes"] else "-"),
        ("chunks", f"{s['chunks']} stored, {s['delta_chunks']} delta-encoded"),
        ("chunk references", f"{s['chunk_refs']} ({s['dedup_hits']} dedup hits)"),
        ("database file", f"{h(s['lmdb_file_bytes'])} "
                          f"({h(s['lmdb_pages_used'] * s['page_size'])} in use)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        cli.out(f"{k + ':':<{width + 1}} {v}")
    codecs = s.get("by_codec") or {}
    if codecs:
        cli.out()
        cli.out(f"{'codec':<12} {'chunks':>8} {'raw':>10} {'stored':>10} {'ratio':>7}")
        for name, d in sorted(codecs.items(), key=lambda kv: -kv[1]["raw"]):
            ratio = f"{d['raw'] / d['stored']:.2f}x" if d["stored"] else "-"
            cli.out(f"{name:<12} {d['chunks']:>8} {h(d['raw']):>10} {h(d['stored']):>10} {ratio:>7}")
    return 0
