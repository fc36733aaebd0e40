"""Delta base selection, shape changes, frozen tensors and stats arithmetic."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load, save

from coralfs.codec import records
from tests.factories import sha256


def _write(repo, name: str, data: bytes) -> str:
    p = os.path.join(repo.root, name)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)
    return p


def _header(repo, rev: str, path: str, tensor: str) -> records.RecordHeader:
    seg = repo.get_manifest(repo.entry(rev, path).manifest).tensors()[tensor]
    return repo.objects.chunk_header(seg.pieces[0].chunk)


def _finetune(w: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return w + 1e-3 * torch.randn(w.shape, generator=g)


def test_new_file_on_other_branch_deltas_against_same_named_tensor(repo):
    torch.manual_seed(0)
    w = torch.randn(512, 256)
    repo.add([_write(repo, "base.safetensors", save({"layer.weight": w.bfloat16()}))])
    repo.commit("base")
    base_chunk = repo.get_manifest(repo.entry("HEAD", "base.safetensors").manifest).tensors()["layer.weight"]
    repo.create_branch("ft")
    repo.checkout("ft")
    data = save({"layer.weight": _finetune(w, 1).bfloat16()})
    repo.add([_write(repo, "finetuned/model.safetensors", data)])  # new path: no history of its own
    repo.commit("fine-tune under a new name")
    h = _header(repo, "ft", "finetuned/model.safetensors", "layer.weight")
    assert h.bases and h.bases[0] == base_chunk.pieces[0].chunk  # found through the persistent index
    raw = len(data)
    stored = len(repo.objects.chunk_record(
        repo.get_manifest(repo.entry("ft", "finetuned/model.safetensors").manifest)
        .tensors()["layer.weight"].pieces[0].chunk))
    assert stored < raw / 3
    repo.objects.chunk_cache.clear()
    assert sha256(repo.open("ft", "finetuned/model.safetensors").read()) == sha256(data)


def test_grown_vocabulary_is_a_delta_over_the_common_rows(repo):
    torch.manual_seed(0)
    emb = torch.randn(1000, 64)
    repo.add([_write(repo, "m.safetensors", save({"embed": emb}))])
    repo.commit("v1")
    old = save({"embed": emb})
    grown = torch.cat([_finetune(emb, 2), torch.randn(24, 64)])  # 24 new tokens
    data = save({"embed": grown})
    repo.add([_write(repo, "m.safetensors", data)])
    repo.commit("grown vocab")
    repo.wait_repack()
    head = _header(repo, "HEAD", "m.safetensors", "embed")
    assert not head.bases, "the newest version is stored whole"
    h = _header(repo, "HEAD~1", "m.safetensors", "embed")
    new_chunk = repo.get_manifest(repo.entry("HEAD", "m.safetensors").manifest).tensors()["embed"].pieces[0].chunk
    assert h.bases == (new_chunk,), "the old tensor is a delta over the rows it shares with the grown one"
    repo.objects.chunk_cache.clear()
    assert sha256(repo.open("HEAD", "m.safetensors").read()) == sha256(data)
    assert sha256(repo.open("HEAD~1", "m.safetensors").read()) == sha256(old)


def test_frozen_tensors_cost_nothing(repo):
    torch.manual_seed(0)
    frozen = torch.randn(256, 256)
    head = torch.randn(256, 4)
    repo.add([_write(repo, "m.safetensors", save({"backbone": frozen, "head": head}))])
    repo.commit("v1")
    stats = repo.add([_write(repo, "m.safetensors", save({"backbone": frozen, "head": _finetune(head, 3)}))])
    repo.commit("v2")
    assert stats.dedup_chunks >= 1 and stats.new_chunks == 1  # only the head is new


def test_stats_arithmetic(repo):
    torch.manual_seed(0)
    w = torch.randn(256, 256)
    sizes = []
    for i in range(3):
        w = _finetune(w, i)
        data = save({"w": w})
        sizes.append(len(data))
        repo.add([_write(repo, "m.safetensors", data)])
        repo.commit(f"v{i}")
    repo.wait_repack()
    s = repo.stats()
    assert s["file_versions"] == 3 and s["logical_bytes"] == sum(sizes)
    with repo.store.read() as t:
        records_bytes = sum(len(v) for _, v in t.items("chunks"))
        object_bytes = sum(len(v) for _, v in t.items("objects"))
        n = sum(1 for _ in t.items("chunks"))
    assert s["stored_bytes"] == records_bytes + object_bytes
    assert s["object_bytes"] == object_bytes and s["chunks"] == n
    assert sum(c["stored"] for c in s["by_codec"].values()) == records_bytes
    assert sum(c["chunks"] for c in s["by_codec"].values()) == n
    assert abs(s["ratio"] - s["logical_bytes"] / s["stored_bytes"]) < 1e-12
    assert s["delta_chunks"] >= 2


def test_record_with_unknown_codec_id_is_rejected():
    import pytest

    from coralfs.errors import FormatError

    for codec in (6, 16, 63, 255):
        rec = records.pack(codec, 4, 8, b"\x00" * 8)
        with pytest.raises(FormatError):
            records.parse_header(rec)


def test_corrupt_base_deep_in_a_chain_never_gives_wrong_bytes(repo):
    """Bases of a chain are decoded unverified (only the chunk on top is hashed): a corrupt
    middle version must still end in IntegrityError for the oldest, never in wrong bytes."""
    from coralfs.errors import IntegrityError

    torch.manual_seed(0)
    w = torch.randn(256, 256)
    datas = []
    for v in range(4):
        w = _finetune(w, v)
        datas.append(save({"w": w}))
        repo.add([_write(repo, "m.safetensors", datas[-1])])
        repo.commit(f"v{v}")
    first = repo.log()[-1][0]
    h = _header(repo, first, "m.safetensors", "w")
    assert h.bases, "the oldest version should be a delta (against the one after it)"
    mid = h.bases[0]
    rec = bytearray(repo.objects.chunk_record(mid))
    hm = records.parse_header(bytes(rec))
    rec[hm.payload_offset + (len(rec) - hm.payload_offset) // 2] ^= 0x10  # a bit deep in the payload
    repo.store.write(lambda t: t.put("chunks", mid, bytes(rec)))
    repo.objects.chunk_cache.clear()
    with pytest.raises(IntegrityError):
        repo.open(first, "m.safetensors").read()
    assert repo.objects.chunk_cache.get(mid) is None  # nothing unverified was cached
    # the versions the corrupt one deltas against still read back exactly
    assert sha256(repo.open("HEAD", "m.safetensors").read()) == sha256(datas[-1])
    assert sha256(repo.open("HEAD~1", "m.safetensors").read()) == sha256(datas[-2])


def test_chain_records_lists_a_chunk_and_all_its_bases(repo):
    torch.manual_seed(1)
    w = torch.randn(256, 256)
    for v in range(3):
        w = _finetune(w, v)
        repo.add([_write(repo, "m.safetensors", save({"w": w}))])
        repo.commit(f"v{v}")
    repo.wait_repack()  # (the replaced versions become deltas in the background)
    first = repo.log()[-1][0]
    top = repo.get_manifest(repo.entry(first, "m.safetensors").manifest).tensors()["w"].pieces[0].chunk
    need = repo.objects.chain_records([top])
    expect, todo = {}, [top]
    while todo:  # the chain, walked header by header
        c = todo.pop()
        expect[c] = len(repo.objects.chunk_record(c))
        todo.extend(repo.objects.chunk_header(c).bases)
    assert need == expect and len(need) >= 2  # the oldest version is a delta: its base is listed


# ------------------------------------------------------------------ reverse chains
def _chunk(repo, rev: str, path: str = "m.safetensors", tensor: str = "w") -> bytes:
    return repo.get_manifest(repo.entry(rev, path).manifest).tensors()[tensor].pieces[0].chunk


def _series(repo, n: int, seed: int = 0, path: str = "m.safetensors") -> list[bytes]:
    torch.manual_seed(seed)
    w = torch.randn(256, 256)
    datas = []
    for v in range(n):
        w = _finetune(w, seed * 100 + v)
        datas.append(save({"w": w}))
        repo.add([_write(repo, path, datas[-1])])
        repo.commit(f"v{v}")
    repo.wait_repack()
    return datas


def test_previous_version_is_demoted_against_the_new_head(repo):
    from coralfs import repack
    from coralfs.repack import read_below

    datas = _series(repo, 3)
    v0, v1, v2 = (_chunk(repo, r) for r in ("HEAD~2", "HEAD~1", "HEAD"))
    h0, h1, h2 = (repo.objects.chunk_header(c) for c in (v0, v1, v2))
    assert not h2.bases and h1.bases == (v2,) and h0.bases == (v1,)
    with repo.store.read() as t:
        n, load, root = read_below(t, v2)  # the chain hanging below the head
        assert read_below(t, v1) == (0, 0, 0) and read_below(t, v0) == (0, 0, 0)
    assert n == 2 and 0 < load < 2 * repack.LOAD_UNIT and root == 1  # the first version is on it
    assert len(repo.objects.chunk_record(v1)) < repack.KEEP_RATIO * len(repo.objects.chunk_record(v2))
    repo.objects.chunk_cache.clear()
    for rev, data in zip(("HEAD~2", "HEAD~1", "HEAD"), datas, strict=True):
        assert sha256(repo.open(rev, "m.safetensors").read()) == sha256(data)


def test_root_and_budget_anchors(repo, monkeypatch):
    from coralfs import repack

    monkeypatch.setattr(repack, "ROOT_KEEP_RATIO", 0.0)  # the first version: always kept
    monkeypatch.setattr(repack, "REVERSE_MAX_BELOW", 2)  # at most two deltas above a keyframe
    datas = _series(repo, 7)
    revs = [f"HEAD~{i}" for i in range(6, 0, -1)] + ["HEAD"]
    lengths = []
    for rev in revs:
        n, c = 0, _chunk(repo, rev)
        while True:
            n += 1
            b = repo.objects.chunk_header(c).bases
            if not b:
                break
            c = b[0]
        lengths.append(n)
    assert lengths[0] == 1  # the root stayed whole
    assert lengths == [1, 3, 2, 1, 3, 2, 1], lengths  # v3 anchors v1 and v2; v4, v5 hang off the head
    repo.objects.chunk_cache.clear()
    for rev, data in zip(revs, datas, strict=True):
        assert sha256(repo.open(rev, "m.safetensors").read()) == sha256(data)


def test_a_fork_demotes_its_base_once(repo):
    _series(repo, 1)
    base = _chunk(repo, "HEAD")
    repo.create_branch("b")
    w0 = load(repo.open("HEAD", "m.safetensors").read())["w"]
    data_main = save({"w": _finetune(w0, 7)})
    repo.add([_write(repo, "m.safetensors", data_main)])
    repo.commit("main v1")
    repo.wait_repack()
    main_head = _chunk(repo, "main")
    assert repo.objects.chunk_header(base).bases == (main_head,)
    repo.checkout("b")
    data_b = save({"w": _finetune(w0, 8)})
    repo.add([_write(repo, "m.safetensors", data_b)])
    repo.commit("b v1")
    repo.wait_repack()
    assert not repo.objects.chunk_header(_chunk(repo, "b")).bases
    assert repo.objects.chunk_header(base).bases == (main_head,)  # demoted once, by main
    repo.objects.chunk_cache.clear()
    assert sha256(repo.open("main", "m.safetensors").read()) == sha256(data_main)
    assert sha256(repo.open("b", "m.safetensors").read()) == sha256(data_b)
    assert sha256(repo.open("b~1", "m.safetensors").read()) == sha256(save({"w": w0}))


def test_a_demotion_is_applied_only_between_keyframes(repo):
    """Either record may change between queueing a demotion and applying it: a demotion
    whose previous version is no longer a keyframe, or whose new version is a delta, is
    dropped (so a delta always points at a chunk that was a keyframe: no cycles)."""
    from coralfs.store.keys import demotion_key as pending_key

    _series(repo, 2)
    v0, v1 = _chunk(repo, "HEAD~1"), _chunk(repo, "HEAD")
    rec0, rec1 = repo.objects.chunk_record(v0), repo.objects.chunk_record(v1)
    assert records.parse_header(rec0).bases == (v1,) and repo.pending_demotions() == 0
    # v1 (a keyframe) against v0 (a delta against v1): would close a cycle; v0 again: not a keyframe
    repo.store.write(lambda t: (t.put("index", pending_key(v0, v1), b""), t.put("index", pending_key(v1, v0), b"")))
    assert repo.pending_demotions() == 2
    s = repo.repack()
    assert (s.examined, s.dropped, s.demoted) == (2, 2, 0) and repo.pending_demotions() == 0
    assert repo.objects.chunk_record(v1) == rec1 and repo.objects.chunk_record(v0) == rec0
