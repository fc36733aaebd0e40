"""Repositories written by earlier coralfs versions keep reading back exactly.

``tests/fixtures/repo-format<N>/`` holds a repository written by the coralfs of format
version N (``tests/fixtures/make_fixture.py``, run once per format version) and
``expected.json``, what it holds. Every fixture is checked with today's code, on a copy
(the committed files are never opened for writing): refs, logs, tags, every file of every
commit byte for byte (SHA-256), fsck, a checkout of the work tree, and a new commit on top
(a new version of a file stored against the old records, repacked, gc'd) with everything
still exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from coralfs.fsck import fsck
from coralfs.gc import gc
from coralfs.repository import Repository

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FORMATS = sorted(FIXTURES.glob("repo-format*"))


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def path_of(key: str) -> str:
    """A path in expected.json (hex of its file-system bytes) as coralfs spells it."""
    return os.fsdecode(bytes.fromhex(key))


def check_commits(repo: Repository, expected: dict) -> None:
    for cid_hex, want in expected["commits"].items():
        cid = bytes.fromhex(cid_hex)
        c = repo.get_commit(cid)
        assert (c.message, [p.hex() for p in c.parents], c.metrics, c.meta, c.author) == \
            (want["message"], want["parents"], want["metrics"], want["meta"], want["author"])
        files = {path_of(k): v for k, v in want["files"].items()}
        entries = repo.ls(cid)
        assert sorted(entries) == sorted(files)
        for path, f in files.items():
            assert (entries[path].size, entries[path].mode) == (f["size"], f["mode"])
            with repo.open(cid, path) as fh:
                data = fh.read()
            assert sha256(data) == f["sha256"], f"{f['name']} at {cid_hex[:12]}"


@pytest.fixture(params=FORMATS, ids=[p.name for p in FORMATS])
def fixture_copy(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, dict]:
    src: Path = request.param
    expected = json.loads((src / "expected.json").read_text())
    root = tmp_path / "repo"
    shutil.copytree(src / ".coralfs", root / ".coralfs")
    for p in (root / ".coralfs").rglob("*"):  # a checkout of the project may have left them read-only
        p.chmod(0o755 if p.is_dir() else 0o644)
    return root, expected


def test_fixtures_exist() -> None:
    assert FORMATS, "no tests/fixtures/repo-format* directory"
    for src in FORMATS:
        data = src / ".coralfs" / "store" / "data.mdb"
        assert data.stat().st_size > 64 << 10, f"{data}: truncated (a Git LFS pointer?)"
        assert data.read_bytes()[16:20] == b"\xde\xc0\xef\xbe", f"{data}: not an LMDB file"  # MDB_MAGIC, LE
        assert not (src / ".coralfs" / "store" / "lock.mdb").exists()
        size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
        assert size < 1 << 20, f"{src}: {size} bytes; keep fixtures small"


def test_old_repository_reads_back_exactly(fixture_copy: tuple[Path, dict]) -> None:
    root, expected = fixture_copy
    with Repository(root, auto_repack=False) as repo:
        assert repo.config["format"] == expected["format"]
        assert repo.current_branch() == expected["head_branch"]
        assert {b: c.hex() for b, c in repo.branches().items()} == expected["branches"]
        tags = {n: {"commit": t.commit.hex(), "message": t.message, "metrics": t.metrics, "meta": t.meta,
                    "tagger": t.tagger} for n, t in repo.tags().items()}
        assert tags == expected["tags"]
        for branch, log in expected["log"].items():
            assert [cid.hex() for cid, _ in repo.log(branch)] == log
        assert {c.hex() for c in repo.commits()} == set(expected["commits"])
        assert repo.pending_demotions() == 0
        st = repo.stats()
        assert (st["chunks"], st["delta_chunks"]) == (expected["chunks"], expected["delta_chunks"])
        check_commits(repo, expected)
        rep = fsck(repo)
        assert rep.ok, [str(p) for p in rep.problems]
        assert rep.garbage_chunks == 0 and rep.garbage_objects == 0


def test_old_repository_checks_out_and_takes_new_commits(fixture_copy: tuple[Path, dict]) -> None:
    root, expected = fixture_copy
    head = expected["branches"][expected["head_branch"]]
    with Repository(root, auto_repack=False) as repo:
        # the work tree is not part of the fixture: checkout writes every file of HEAD
        assert sorted(repo.status().deleted) == sorted(path_of(k) for k in expected["commits"][head]["files"])
        repo.checkout(expected["head_branch"], force=True)
        for k, f in expected["commits"][head]["files"].items():
            assert sha256((root / path_of(k)).read_bytes()) == f["sha256"]
        assert repo.status().clean

        # a new version of every safetensors file (a few tensor bytes changed): stored against
        # the old records, then the old version becomes a reverse delta against it
        new: dict[str, str] = {}
        for k in expected["commits"][head]["files"]:
            p = path_of(k)
            if p.endswith(".safetensors"):
                data = bytearray((root / p).read_bytes())
                hlen = int.from_bytes(data[:8], "little")
                for i in range(8 + hlen, len(data), 97):
                    data[i] ^= 0x01
                (root / p).write_bytes(bytes(data))
                new[p] = sha256(bytes(data))
        (root / "notes.txt").write_text("written by today's coralfs\n")
        new["notes.txt"] = sha256(b"written by today's coralfs\n")
        assert new.keys() > {"notes.txt"}
        repo.add([root / p for p in new])
        cid = repo.commit("on top of an old repository", metrics={"val_acc": 1.0})
        assert repo.get_commit(cid).parents == (bytes.fromhex(head),)
        assert repo.repack().demoted > 0
        gc(repo, grace=0)
        rep = fsck(repo)
        assert rep.ok, [str(p) for p in rep.problems]

    with Repository(root, cache_bytes=0, auto_repack=False) as repo:  # a fresh reader, no cache
        for p, digest in new.items():
            with repo.open(cid, p) as f:
                assert sha256(f.read()) == digest
        check_commits(repo, expected)  # every old commit still exact (all reachable: nothing swept)
        assert len(repo.commits()) == len(expected["commits"]) + 1
