"""A/B of two versions of the code: add+commit of the newest finetune_fp32 checkpoint
(91 MB safetensors, trained by bench/corpus.py) into a fresh repository, and reading it
back with a fresh Repository in 8 MiB blocks (checked by SHA-256).

    python -m bench.ab_micro SCRATCH_DIR REPS        # with PYTHONPATH at the code to measure

prints the seconds of each repetition as JSON; run it alternately on both codes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

from coralfs.repository import Repository

CORPUS = Path(__file__).resolve().parent / ".cache" / "corpus"


def main() -> None:
    files = sorted((CORPUS / "finetune_fp32").glob("*.safetensors"))
    if not files:
        sys.exit("no corpus: run `python -m bench.corpus` first")
    src = files[-1]
    want = hashlib.sha256(src.read_bytes()).hexdigest()
    tmp, reps = Path(sys.argv[1]), int(sys.argv[2])
    out: dict[str, list[float]] = {"ingest": [], "read": []}
    for _ in range(reps):
        root = tmp / "ab-micro"
        shutil.rmtree(root, ignore_errors=True)
        repo = Repository.init(root)
        shutil.copyfile(src, root / "m.safetensors")
        os.sync()
        t0 = time.perf_counter()
        repo.add([root / "m.safetensors"])
        repo.commit("x")
        out["ingest"].append(time.perf_counter() - t0)
        repo.wait_repack()
        repo.close()
        r = Repository(root)
        blocks = []
        t0 = time.perf_counter()
        with r.open("HEAD", "m.safetensors") as f:
            while b := f.read(8 << 20):
                blocks.append(b)
        out["read"].append(time.perf_counter() - t0)
        r.close()
        h = hashlib.sha256()  # (checked after the timing)
        for b in blocks:
            h.update(b)
        if h.hexdigest() != want:
            sys.exit("read-back is NOT bit-exact")
    shutil.rmtree(tmp / "ab-micro", ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
