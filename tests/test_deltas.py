"""Delta base selection, shape changes, frozen tensors and stats arithmetic (issue 3)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save

from coralfs import records
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
    grown = torch.cat([_finetune(emb, 2), torch.randn(24, 64)])  # 24 new tokens
    data = save({"embed": grown})
    repo.add([_write(repo, "m.safetensors", data)])
    repo.commit("grown vocab")
    h = _header(repo, "HEAD", "m.safetensors", "embed")
    assert h.bases, "a grown tensor still deltas against the old one"
    repo.objects.chunk_cache.clear()
    assert sha256(repo.open("HEAD", "m.safetensors").read()) == sha256(data)


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
    middle version must still end in IntegrityError for the newest, never in wrong bytes."""
    from coralfs.errors import IntegrityError

    torch.manual_seed(0)
    w = torch.randn(256, 256)
    datas = []
    for v in range(4):
        w = _finetune(w, v)
        datas.append(save({"w": w}))
        repo.add([_write(repo, "m.safetensors", datas[-1])])
        repo.commit(f"v{v}")
    h = _header(repo, "HEAD", "m.safetensors", "w")
    assert h.bases, "the newest version should be a delta"
    mid = h.bases[0]
    rec = bytearray(repo.objects.chunk_record(mid))
    hm = records.parse_header(bytes(rec))
    rec[hm.payload_offset + (len(rec) - hm.payload_offset) // 2] ^= 0x10  # a bit deep in the payload
    repo.store.write(lambda t: t.put("chunks", mid, bytes(rec)))
    repo.objects.chunk_cache.clear()
    with pytest.raises(IntegrityError):
        repo.open("HEAD", "m.safetensors").read()
    assert repo.objects.chunk_cache.get(mid) is None  # nothing unverified was cached
    # the versions below the corrupt one still read back exactly
    first = repo.log()[-1][0]
    assert sha256(repo.open(first, "m.safetensors").read()) == sha256(datas[0])


def test_chain_records_lists_a_chunk_and_all_its_bases(repo):
    torch.manual_seed(1)
    w = torch.randn(256, 256)
    for v in range(3):
        w = _finetune(w, v)
        repo.add([_write(repo, "m.safetensors", save({"w": w}))])
        repo.commit(f"v{v}")
    top = repo.get_manifest(repo.entry("HEAD", "m.safetensors").manifest).tensors()["w"].pieces[0].chunk
    need = repo.objects.chain_records([top])
    expect, todo = {}, [top]
    while todo:  # the chain, walked header by header
        c = todo.pop()
        expect[c] = len(repo.objects.chunk_record(c))
        todo.extend(repo.objects.chunk_header(c).bases)
    assert need == expect and len(need) >= 2  # the newest version is a delta: its base is listed
