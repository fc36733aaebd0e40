"""Bit-exact round trips: every file read back hashes equal to the original."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from coralfs.formats import split
from coralfs.repository import Repository
from tests.factories import TinyNet, save_pt, sha256, train_steps, training_series, varied_state_dict


def _commit_and_check(repo: Repository, files: dict[str, bytes | os.PathLike]) -> bytes:
    paths = []
    for rel, src in files.items():
        dst = os.path.join(repo.root, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if isinstance(src, bytes):
            with open(dst, "wb") as f:
                f.write(src)
        else:
            os.replace(src, dst)
        paths.append(dst)
    want = {os.path.relpath(p, repo.root): sha256(p) for p in paths}
    repo.add(paths)
    cid = repo.commit("test")
    for rel, h in want.items():
        assert sha256(repo.open(cid, rel).read()) == h, rel
    return cid


def test_torch_save_many_dtypes_and_views(repo, tmp_path):
    p = save_pt(varied_state_dict(), tmp_path / "v.pt")
    data = p.read_bytes()
    fmt, regions = split(memoryview(data))
    assert fmt == "torch-zip"
    tensors = {r.name: r for r in regions if r.kind == "tensor"}
    assert tensors["f32"].dtype == "F32" and tensors["bf16"].dtype == "BF16" and tensors["f16"].width == 2
    assert tensors["i64"].width == 8 and tensors["bool"].dtype == "BOOL"
    assert "nested.list.1.deep" in tensors
    _commit_and_check(repo, {"v.pt": p})
    loaded = torch.load(repo.open("HEAD", "v.pt"), weights_only=True)
    assert torch.equal(loaded["view_b"], varied_state_dict()["view_b"])
    assert loaded["view_a"].untyped_storage().data_ptr() == loaded["view_b"].untyped_storage().data_ptr()


def test_training_checkpoint_series_roundtrip(repo, tmp_path):
    hashes = []
    for i, ck in enumerate(training_series(4)):
        p = save_pt(ck, tmp_path / f"c{i}.pt")
        hashes.append(sha256(p))
        os.replace(p, os.path.join(repo.root, "model.pt"))
        repo.add([os.path.join(repo.root, "model.pt")])
        repo.commit(f"step {i}")
    for i, (cid, _) in enumerate(reversed(repo.log())):
        assert sha256(repo.open(cid, "model.pt").read()) == hashes[i]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
                                   torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_safetensors_dtypes(repo, tmp_path, dtype):
    torch.manual_seed(0)
    t = torch.randn(33, 17) * 10
    sd = {"w": t.to(dtype), "b": t[0].to(dtype).clone(), "empty": torch.empty(0, dtype=dtype)}
    p = tmp_path / "m.safetensors"
    save_file(sd, p, metadata={"format": "pt"})
    fmt, regions = split(memoryview(p.read_bytes()))
    assert fmt == "safetensors" and {r.name for r in regions if r.kind == "tensor"} == {"w", "b"}
    _commit_and_check(repo, {"m.safetensors": p})


def test_hf_style_model_directory(repo, tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    files = {
        "hf/config.json": json.dumps({"model_type": "tiny", "hidden": 32}).encode(),
        "hf/tokenizer.json": json.dumps({"vocab": {f"tok{i}": i for i in range(2000)}}).encode(),
        "hf/special_tokens_map.json": b"{}",
        "hf/README.md": b"# tiny\n" * 3000,
    }
    sd = model.state_dict()
    keys = sorted(sd)
    save_file({k: sd[k] for k in keys[: len(keys) // 2]}, tmp_path / "s1.safetensors")
    save_file({k: sd[k] for k in keys[len(keys) // 2:]}, tmp_path / "s2.safetensors")
    files["hf/model-00001-of-00002.safetensors"] = (tmp_path / "s1.safetensors").read_bytes()
    files["hf/model-00002-of-00002.safetensors"] = (tmp_path / "s2.safetensors").read_bytes()
    files["hf/model.safetensors.index.json"] = json.dumps({"weight_map": {k: "x" for k in keys}}).encode()
    cid = _commit_and_check(repo, files)
    assert set(repo.ls(cid)) == set(files)


def test_large_tensor_is_chunked_and_random_reads_exact(repo, tmp_path):
    torch.manual_seed(0)
    big = torch.randn(3 * 1024 * 1024 + 5)  # ~12 MiB: several chunks, odd length
    p = tmp_path / "big.safetensors"
    save_file({"big": big, "small": torch.ones(3)}, p)
    data = p.read_bytes()
    _commit_and_check(repo, {"big.safetensors": p})
    m = repo.get_manifest(repo.entry("HEAD", "big.safetensors").manifest)
    seg = m.tensors()["big"]
    assert len(seg.pieces) >= 3 and all(pc.length % 4 == 0 for pc in seg.pieces)
    f = repo.open("HEAD", "big.safetensors")
    for off, n in [(0, 10), (4 << 20, 100), ((4 << 20) - 3, 7), (len(data) - 5, 100), (12345678, 1 << 20)]:
        f.seek(off)
        assert f.read(n) == data[off: off + n]


def test_generic_files_and_empty(repo, tmp_path):
    import random

    rnd = random.Random(0)
    words = [bytes(rnd.choice(b"abcdefgh") for _ in range(6)) for _ in range(500)]
    text = b" ".join(rnd.choice(words) for _ in range(600_000))
    _commit_and_check(repo, {"empty.bin": b"", "notes.txt": text, "one": b"x"})
    # content-defined chunking keeps dedup when bytes shift: inserting 3 bytes at the front
    before = repo.stats()["chunks"]
    _commit_and_check(repo, {"notes2.txt": b"abc" + text})
    after = repo.stats()
    assert after["chunks"] - before <= 2, "shifted content should reuse almost all chunks"


def test_dedup_same_file_on_two_branches_costs_no_chunks(repo, tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), 2)
    p = save_pt(model.state_dict(), tmp_path / "m.pt")
    data = p.read_bytes()
    _commit_and_check(repo, {"m.pt": data})
    chunks = repo.stats()["chunks"]
    repo.create_branch("other")
    repo.checkout("other")
    os.makedirs(os.path.join(repo.root, "copy"))
    with open(os.path.join(repo.root, "copy", "m.pt"), "wb") as f:
        f.write(data)
    stats = repo.add([os.path.join(repo.root, "copy", "m.pt")])
    repo.commit("copy")
    assert stats.new_chunks == 0 and stats.dedup_chunks == stats.chunks > 0
    assert repo.stats()["chunks"] == chunks
    assert sha256(repo.open("other", "copy/m.pt").read()) == sha256(data)


def test_repo_save_state_dict_without_temp_file(repo):
    torch.manual_seed(0)
    model = TinyNet()
    repo.save(model.state_dict(), "weights.safetensors")
    repo.save({"model": model.state_dict(), "step": 3}, "ckpt.pt")
    cid = repo.commit("saved")
    from safetensors.torch import load

    back = load(repo.open(cid, "weights.safetensors").read())
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v)
    assert torch.load(repo.open(cid, "ckpt.pt"), weights_only=True)["step"] == 3
    assert repo.status().clean and not repo.status().deleted  # not materialised, not "deleted"
    repo.checkout("main", force=True)
    assert os.path.isfile(os.path.join(repo.root, "weights.safetensors"))


def test_delta_chain_depth_is_bounded_and_every_version_exact(repo):
    """40 versions of one tensor: the newest is stored whole, older ones are reverse deltas
    (each against the version after it), no chain is longer than the policy's bound, and
    every version reads back exactly."""
    from safetensors.torch import save

    from coralfs import repack
    from coralfs.repack import read_below

    torch.manual_seed(0)
    w = torch.randn(256, 256)
    versions = []
    path = os.path.join(repo.root, "m.safetensors")
    for i in range(40):
        w = w + 1e-3 * torch.randn(256, 256)  # a fine-tune-like walk
        data = save({"w": w.bfloat16()})
        with open(path, "wb") as f:
            f.write(data)
        repo.add([path])
        versions.append((repo.commit(f"v{i}"), sha256(data)))
    repo.wait_repack()

    def chain(cid: bytes) -> int:  # records a read of this chunk decodes
        h = repo.objects.chunk_header(cid)
        return 1 + max((chain(b) for b in h.bases), default=0)

    chunks = [repo.get_manifest(repo.entry(c, "m.safetensors").manifest).tensors()["w"].pieces[0].chunk
              for c, _ in versions]
    lengths = [chain(c) for c in chunks]
    assert lengths[-1] == 1  # the newest version: one record
    assert max(lengths) <= repack.REVERSE_MAX_BELOW + 1, lengths
    assert sum(1 for n in lengths if n > 1) >= 30, lengths  # deltas were actually used
    anchors = [i for i, n in enumerate(lengths) if n == 1]
    assert len(anchors) >= 3, lengths  # 40 versions need anchors to bound the chains
    # a keyframe knows the longest chain that ends at it
    for i in anchors:
        below = [lengths[j] - 1 for j in range(i) if j > max([a for a in anchors if a < i], default=-1)]
        with repo.store.read() as t:
            assert read_below(t, chunks[i])[0] == max(below, default=0)
    repo.objects.chunk_cache.clear()
    for cid, h in versions:
        assert sha256(repo.open(cid, "m.safetensors").read()) == h
