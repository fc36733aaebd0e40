"""Delta chain shapes on real series: forward chains (shipped before the third session), the
shipped reverse chains (newest version whole, older versions demoted by the repacker), and
simple reverse-chain models.

The mount's read targets (bench/mount.py's TARGETS) want the newest version of a series to read about as
fast as the oldest. With forward deltas (each version a delta against the one before,
two-level chains of depth <= 4, keyframe every 16) the newest is the most expensive
version to read. With reverse deltas the newest version is a keyframe and each older
version a delta against the version after it.

This script measures, on real series from ``bench/corpus.py``, for the tensor pieces
(1 MiB, as ingest cuts them): stored bytes, and the records (and their bytes) a read of
the newest, the oldest and the costliest version must decode, for

* forward, two-level: a real ingest of each version as a file with no history of its own
  (that path still chains forward against the same-named piece);
* reverse, repacker: a real ingest of each version over the previous one, repacked (what
  ``coralfs add``/``commit`` store now);
* reverse models, a keyframe every K in ``--keyframes`` versions back from the head (and
  the largest K with the first version kept too): each older piece encoded with the
  shipped codec choice against the next version (and, for the two-base predictor, the
  one after it).

Usage::

    python bench/chain_shape.py [--series finetune_fp32,scratch_pt] [--keyframes 4,16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coralfs.codec import records  # noqa: E402
from coralfs.codec import tensor as tensorcodec  # noqa: E402
from coralfs.formats import split  # noqa: E402
from coralfs.hashing import digest  # noqa: E402
from coralfs.ingest import CHUNK_TARGET, MappedFile  # noqa: E402
from coralfs.repository import Repository  # noqa: E402


def tensor_pieces(view: memoryview, name: str) -> list[tuple[str, int, int, int]]:
    """(tensor name, width, start, end) of each 1 MiB tensor piece, as ingest cuts them."""
    _, regions = split(view, name)
    out = []
    for r in regions:
        if r.kind != "tensor":
            continue
        step = max(r.width, CHUNK_TARGET - CHUNK_TARGET % r.width)
        for s in range(r.start, r.end, step):
            out.append((f"{r.name}#{(s - r.start) // step}", r.width, s, min(s + step, r.end)))
    return out


def ingested(files: list[Path], history: bool) -> dict[str, float]:
    """Ingest the series for real; stored tensor bytes and read costs. ``history``: each
    version over the previous one, as ``coralfs add`` does (shipped: reverse chains, after
    the repack); without, each version is a file with no history of its own, whose pieces
    delta forward against the same-named piece (the two-level forward policy, shipped for
    every file before the third session)."""
    with tempfile.TemporaryDirectory() as d:
        repo = Repository.init(d, auto_repack=False)
        try:
            prev = None
            entries = []
            t = time.perf_counter()
            for f in files:
                prev, _ = repo.ingest_file(f, "m", prev if history else None)
                entries.append(prev)
                repo.repack()
            secs = time.perf_counter() - t
            stored, seen = 0, set()
            for e in entries:
                for seg in repo.get_manifest(e.manifest).segments:
                    if seg.kind != "tensor":
                        continue
                    for p in seg.pieces:
                        if p.chunk is not None and p.chunk not in seen:
                            seen.add(p.chunk)
                            stored += len(repo.objects.chunk_record(p.chunk))

            def read_cost(e) -> tuple[int, int]:
                need = repo.objects.chain_records(p.chunk for seg in repo.get_manifest(e.manifest).segments
                                                  if seg.kind == "tensor" for p in seg.pieces if p.chunk is not None)
                return len(need), sum(need.values())

            costs = [read_cost(e) for e in entries]
        finally:
            repo.close()
    deepest = max(costs, key=lambda c: c[1])
    return {"stored": stored, "newest_records": costs[-1][0], "newest_bytes": costs[-1][1],
            "oldest_records": costs[0][0], "oldest_bytes": costs[0][1], "deepest_records": deepest[0],
            "deepest_bytes": deepest[1], "encodes_per_commit": 2.0 if history else 1.0, "ingest_s": secs}


def reverse(files: list[Path], keyframe_every: int, keep_first: bool = False) -> dict[str, float]:
    """Stored bytes and read costs with the newest version as keyframe and reverse deltas
    (``keep_first``: the first version also stays a keyframe, so both ends read shallow)."""
    maps = [MappedFile(f) for f in files]
    try:
        views = [m.view for m in maps]
        cuts = [dict((k, (w, s, e)) for k, w, s, e in tensor_pieces(v, f.name)) for v, f in zip(views, files, strict=True)]
        head = len(files) - 1
        stored = 0
        # per version: records (and bytes) a read decodes; record sizes by (piece, version)
        size: dict[tuple[str, int], int] = {}
        base_of: dict[tuple[str, int], tuple[int, ...]] = {}
        seen_ids: set[bytes] = set()
        for key, (w, _, _) in cuts[head].items():
            data = [bytes(views[v][cuts[v][key][1]:cuts[v][key][2]]) if key in cuts[v] else None
                    for v in range(len(files))]
            for v in range(head, -1, -1):
                raw = data[v]
                if raw is None:
                    continue
                cid = digest(raw)
                if cid in seen_ids:  # identical to a version already stored: a dedup hit
                    size[(key, v)] = 0
                    base_of[(key, v)] = ()
                    continue
                seen_ids.add(cid)
                def is_key(x: int) -> bool:
                    return (head - x) % keyframe_every == 0 or (keep_first and x == 0)

                keyframe = is_key(v) or data[v + 1] is None
                b1 = None if keyframe else data[v + 1]
                b2 = data[v + 2] if not keyframe and v + 2 <= head and not is_key(v + 1) else None
                codec, payload = tensorcodec.encode(raw, w, b1, b2)
                nb = tensorcodec.uses_bases(codec)
                size[(key, v)] = records.HEADER_LEN + 32 * nb + (len(raw) if codec == tensorcodec.RAW else len(payload))
                base_of[(key, v)] = tuple(v + 1 + i for i in range(nb))
                stored += size[(key, v)]

        def read_cost(version: int) -> tuple[int, int]:
            n = b = 0
            for key in cuts[version]:
                todo, done = [version], set()
                while todo:
                    v = todo.pop()
                    if v in done or (key, v) not in size:
                        continue
                    done.add(v)
                    n += 1
                    b += size[(key, v)]
                    todo.extend(base_of[(key, v)])
            return n, b

        costs = [read_cost(v) for v in range(len(files))]
    finally:
        for m in maps:
            m.close()
    deepest = max(costs, key=lambda c: c[1])
    return {"stored": stored, "newest_records": costs[-1][0], "newest_bytes": costs[-1][1],
            "oldest_records": costs[0][0], "oldest_bytes": costs[0][1], "deepest_records": deepest[0],
            "deepest_bytes": deepest[1], "encodes_per_commit": 3.0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--series", default="finetune_fp32,scratch_pt")
    p.add_argument("--keyframes", default="4,16", help="reverse: a keyframe every K versions back from the head")
    args = p.parse_args(argv)
    from bench.corpus import ensure_corpus

    names = args.series.split(",")
    corpus = ensure_corpus(only=names)
    rows = []
    for name in names:
        files = list(corpus[name])
        results = [("forward, two-level (shipped before)", ingested(files, False)),
                   ("reverse, repacker (shipped)", ingested(files, True))]
        for k in (int(x) for x in args.keyframes.split(",")):
            results.append((f"reverse, keyframe every {k}", reverse(files, k)))
        k = max(int(x) for x in args.keyframes.split(","))
        results.append((f"reverse, every {k} + first kept", reverse(files, k, keep_first=True)))
        for policy, r in results:
            rows.append((name, policy, f"{r['stored'] / 1e6:.1f} MB",
                         f"{r['newest_records']} ({r['newest_bytes'] / 1e6:.0f} MB)",
                         f"{r['oldest_records']} ({r['oldest_bytes'] / 1e6:.0f} MB)",
                         f"{r['deepest_records']} ({r['deepest_bytes'] / 1e6:.0f} MB)",
                         f"{r['newest_bytes'] / max(1, r['oldest_bytes']):.2f}x",
                         f"{r['encodes_per_commit']:.0f}"))
    head = ("series", "chains", "tensor records stored", "newest: records (bytes)", "oldest: records (bytes)",
            "costliest version", "newest/oldest bytes", "encodes per piece per commit")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    print("\n".join(lines))
    print(f"\n{len(files)} versions per series; tensor pieces only (the rest is the same either way); reverse "
          "sizes are the shipped codec choice per piece (tensorcodec.encode) against the next version(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
