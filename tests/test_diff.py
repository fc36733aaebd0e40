"""Model-aware diff: numbers checked against torch on really trained weights; exact, decode-free change detection."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import save as st_save  # noqa: E402

from coralfs import cli, ingest  # noqa: E402
from coralfs.diff import best_commit, diff, to_float64  # noqa: E402
from coralfs.repository import Repository  # noqa: E402
from coralfs.store.objectstore import ObjectStore  # noqa: E402
from tests.factories import TinyNet, train_steps  # noqa: E402


def _commit(repo: Repository, files: dict, msg: str, branch: str = "main", **kw) -> bytes:
    changes = {}
    for path, obj in files.items():
        if isinstance(obj, bytes):
            with repo.writing():
                mid, man, _ = repo.ingest_buffer(memoryview(obj), path)
            from coralfs.store.objects import TreeEntry
            changes[path] = TreeEntry(mid, man.size)
        elif obj is None:
            changes[path] = None
        else:
            changes[path] = repo.save(obj, path, stage=False)
    return repo.commit_changes(branch, changes, msg, **kw)


def _expected(a: torch.Tensor, b: torch.Tensor) -> dict:
    a64, b64 = a.reshape(-1).double(), b.reshape(-1).double()
    d = b64 - a64
    ab = a.contiguous().reshape(-1).view(torch.uint8).reshape(a.numel(), -1)
    bb = b.contiguous().reshape(-1).view(torch.uint8).reshape(b.numel(), -1)
    changed = int((ab != bb).any(1).sum())
    return {"changed": changed, "l2": float(d.norm()), "rel": float(d.norm() / a64.norm()),
            "max": float(d.abs().max()), "cos": float(torch.dot(a64, b64) / (a64.norm() * b64.norm()))}


def _check(td, a: torch.Tensor, b: torch.Tensor) -> None:
    e = _expected(a, b)
    assert td.status == "changed", td
    assert td.numel == a.numel()
    assert td.changed_elements == e["changed"]
    assert td.changed_fraction == pytest.approx(e["changed"] / a.numel())
    assert td.l2 == pytest.approx(e["l2"], rel=1e-9, abs=1e-12)
    assert td.rel_l2 == pytest.approx(e["rel"], rel=1e-9, abs=1e-12)
    assert td.max_abs == pytest.approx(e["max"], rel=1e-12, abs=1e-15)
    assert td.cosine == pytest.approx(e["cos"], rel=1e-9)


@functools.cache
def _trained_cached(steps: tuple[int, ...], adam: bool) -> list:
    return _train(list(steps), adam)


def _trained(steps: list[int], adam: bool = True) -> list:
    return _trained_cached(tuple(steps), adam)


def _train(steps: list[int], adam: bool) -> list:
    torch.manual_seed(0)
    m = TinyNet()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2) if adam else torch.optim.SGD(m.parameters(), lr=0.1)
    snaps = []
    for i, n in enumerate(steps):
        train_steps(m, opt, n, seed=i)
        snaps.append({"model": {k: v.clone() for k, v in m.state_dict().items()},
                      "optimizer": {"state": {k: {kk: vv.clone() if torch.is_tensor(vv) else vv
                                                  for kk, vv in s.items()}
                                              for k, s in opt.state_dict()["state"].items()},
                                    "param_groups": opt.state_dict()["param_groups"]},
                      "step": sum(steps[: i + 1])})
    return snaps


# ------------------------------------------------------------------ numbers
def test_pt_numbers_match_torch_on_trained_weights_with_nested_optimizer_state(repo):
    s1, s2 = _trained([3, 2])
    _commit(repo, {"ckpt.pt": s1}, "one")
    _commit(repo, {"ckpt.pt": s2}, "two")
    res = diff(repo, "HEAD~1", "HEAD")
    (f,) = res.files
    assert f.kind == "checkpoint" and f.status == "changed" and f.format_b == "torch-zip"
    by = {t.name: t for t in f.tensors}
    flat1 = {f"model.{k}": v for k, v in s1["model"].items()}
    flat2 = {f"model.{k}": v for k, v in s2["model"].items()}
    for pid, st in s1["optimizer"]["state"].items():
        for k, v in st.items():
            flat1[f"optimizer.state.{pid}.{k}"] = v
            flat2[f"optimizer.state.{pid}.{k}"] = s2["optimizer"]["state"][pid][k]
    assert "optimizer.state.0.exp_avg" in by and "optimizer.state.0.exp_avg_sq" in by
    assert set(by) == set(flat1)
    n_checked = 0
    for name, a in flat1.items():
        b = flat2[name]
        td = by[name]
        if torch.equal(a, b) and a.dtype == b.dtype:
            assert td.status == "unchanged"
            continue
        if a.dtype.is_floating_point:
            _check(td, a, b)
            n_checked += 1
        else:  # num_batches_tracked (I64)
            assert td.status == "changed" and td.max_abs == float((b - a).abs().max())
    assert n_checked >= 10
    s = res.summary()
    assert s["tensors_changed"] == len(f.changed_tensors) > 0
    assert s["params_changed"] == sum(_expected(flat1[t.name], flat2[t.name])["changed"] for t in f.changed_tensors
                                      if flat1[t.name].dtype.is_floating_point) + \
        sum(1 for t in f.changed_tensors if not flat1[t.name].dtype.is_floating_point)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_safetensors_float_dtypes_match_torch(repo, dtype):
    s1, s2 = _trained([2, 2], adam=False)
    a = {k: v.to(dtype) if v.is_floating_point() else v for k, v in s1["model"].items()}
    b = {k: v.to(dtype) if v.is_floating_point() else v for k, v in s2["model"].items()}
    _commit(repo, {"m.safetensors": a}, "one")
    _commit(repo, {"m.safetensors": b}, "two")
    (f,) = diff(repo, "HEAD~1", "HEAD").files
    by = {t.name: t for t in f.tensors}
    for k in a:
        if a[k].is_floating_point() and not torch.equal(a[k], b[k]):
            assert by[k].dtype_a == {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                                     torch.float64: "F64"}[dtype]
            _check(by[k], a[k], b[k])


def test_bf16_decoding_is_exact():
    x = torch.randn(1000).bfloat16()
    raw = x.view(torch.uint16).numpy().tobytes()
    np.testing.assert_array_equal(to_float64(raw, "BF16"), x.double().numpy())
    for name, td in (("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)):
        allb = torch.arange(256, dtype=torch.uint8)
        ref = allb.view(td).double().numpy()
        got = to_float64(allb.numpy().tobytes(), name)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        np.testing.assert_array_equal(got[~np.isnan(ref)], ref[~np.isnan(ref)])


def test_status_kinds_int_tensors_and_one_bit(repo):
    torch.manual_seed(3)
    w = torch.randn(16, 8)
    a = {"w": w, "ids": torch.arange(10, dtype=torch.int64), "gone": torch.ones(3), "retyped": torch.ones(4),
         "reshaped": torch.zeros(2, 3), "same": torch.randn(5)}
    flipped = w.clone()
    flipped.view(torch.int32)[3, 2] ^= 1  # one bit of one element
    ids = a["ids"].clone()
    ids[[1, 7]] += torch.tensor([5, -3])
    b = {"w": flipped, "ids": ids, "new": torch.ones(2), "retyped": torch.ones(4, dtype=torch.float16),
         "reshaped": torch.zeros(3, 2), "same": a["same"]}
    _commit(repo, {"m.safetensors": a}, "one")
    _commit(repo, {"m.safetensors": b}, "two")
    (f,) = diff(repo, "HEAD~1", "HEAD").files
    by = {t.name: t for t in f.tensors}
    assert by["w"].status == "changed" and by["w"].changed_elements == 1 and by["w"].bytes_differ == 4
    assert by["w"].max_abs == pytest.approx(float((flipped.double() - w.double()).abs().max()))
    assert by["ids"].status == "changed" and by["ids"].changed_elements == 2
    assert by["ids"].max_abs == 5.0 and by["ids"].l2 == pytest.approx(math.sqrt(34))
    assert by["gone"].status == "removed" and by["new"].status == "added"
    assert by["retyped"].status == "dtype-changed" and (by["retyped"].dtype_a, by["retyped"].dtype_b) == ("F32", "F16")
    assert by["reshaped"].status == "shape-changed" and by["reshaped"].shape_b == [3, 2]
    assert by["same"].status == "unchanged"
    assert f.params_changed == 1 + 2 + 3 + 2 + 4 + 6


# ------------------------------------------------------------------ exact and decode-free
def test_unchanged_tensors_cost_no_decoding(repo, monkeypatch):
    s1, s2 = _trained([2, 1], adam=False)
    b = dict(s1["model"])
    b["fc2.weight"] = s2["model"]["fc2.weight"]  # one tensor changed
    _commit(repo, {"m.safetensors": s1["model"], "x.pt": s1["model"], "config.json": b'{"a": 1}'}, "one")
    _commit(repo, {"m.safetensors": b, "config.json": b'{"a": 2}'}, "two")
    ta = repo.get_manifest(repo.entry("HEAD~1", "m.safetensors").manifest).tensors()
    tb = repo.get_manifest(repo.entry("HEAD", "m.safetensors").manifest).tensors()
    allowed = {p.chunk for p in ta["fc2.weight"].pieces + tb["fc2.weight"].pieces}
    decoded: list[bytes] = []
    orig = ObjectStore.get_chunk

    def counting(self, cid, _depth=0):
        if _depth == 0:
            decoded.append(cid)
        return orig(self, cid, _depth)

    monkeypatch.setattr(ObjectStore, "get_chunk", counting)
    repo.objects.chunk_cache.clear()
    res = diff(repo, "HEAD~1", "HEAD")
    by = {f.path: f for f in res.files}
    assert by["x.pt"].status == "unchanged"
    assert [t.name for t in by["m.safetensors"].changed_tensors] == ["fc2.weight"]
    assert decoded and set(decoded) <= allowed
    assert by["config.json"].kind == "file" and "not a checkpoint" in by["config.json"].note


def test_multi_piece_tensors_stream_across_unaligned_pieces(repo, monkeypatch):
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.standard_normal(5000).astype(np.float32))
    b = a.clone()
    b[4100:4200] += 0.5
    monkeypatch.setattr(ingest, "CHUNK_TARGET", 4096)
    _commit(repo, {"m.safetensors": {"t": a}}, "one")
    monkeypatch.setattr(ingest, "CHUNK_TARGET", 3000)  # other piece boundaries on the new side
    _commit(repo, {"m.safetensors": {"t": b}}, "two")
    segs = [repo.get_manifest(repo.entry(r, "m.safetensors").manifest).tensors()["t"] for r in ("HEAD~1", "HEAD")]
    assert len(segs[0].pieces) == 5 and len(segs[1].pieces) == 7
    (f,) = diff(repo, "HEAD~1", "HEAD").files
    _check(f.tensors[0], a, b)
    assert f.tensors[0].changed_elements == 100


def test_paths_filter_added_removed_files_and_json(repo):
    torch.manual_seed(0)
    _commit(repo, {"a/m.safetensors": {"x": torch.ones(3)}, "b/c.txt": b"hello"}, "one")
    _commit(repo, {"a/m.safetensors": None, "a/n.pt": {"y": torch.zeros(2)}, "b/c.txt": b"world"}, "two")
    res = diff(repo, "HEAD~1", "HEAD", ["a"])
    assert [(f.path, f.status) for f in res.files] == [("a/m.safetensors", "removed"), ("a/n.pt", "added")]
    assert res.files[1].tensors[0].status == "added" and res.summary()["params_changed"] == 3 + 2
    doc = json.loads(json.dumps(res.to_json()))
    assert doc["summary"]["files_added"] == 1 and doc["files"][0]["tensors"][0]["name"] == "x"


def test_cli_diff(repo, capsys, monkeypatch):
    s1, s2 = _trained([2, 1], adam=False)
    _commit(repo, {"m.pt": s1["model"], "cfg.json": b"{}"}, "one")
    _commit(repo, {"m.pt": s2["model"], "cfg.json": b"{ }"}, "two")
    rc = cli.main(["-R", repo.root, "diff", "HEAD~1", "HEAD"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "M m.pt  (torch-zip;" in out and "~ fc1.weight" in out and "cos " in out
    assert "M cfg.json" in out and "not a checkpoint" in out
    assert "tensor(s) changed" in out and "parameter(s) changed" in out
    rc = cli.main(["-R", repo.root, "diff", "HEAD~1", "HEAD", "m.pt", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and [f["path"] for f in doc["files"]] == ["m.pt"]
    assert doc["summary"]["tensors_changed"] == doc["files"][0]["tensors_changed"] > 0
    assert cli.main(["-R", repo.root, "diff", "HEAD", "nope"]) == 3


# ------------------------------------------------------------------ metrics
def test_best_commit_by_metric(repo, capsys):
    c1 = _commit(repo, {"a.txt": b"1"}, "one", metrics={"acc": 0.5, "loss": 2.0})
    c2 = _commit(repo, {"a.txt": b"2"}, "two", metrics={"acc": 0.9, "loss": 1.0})
    c3 = _commit(repo, {"a.txt": b"3"}, "three", metrics={"acc": 0.7, "loss": 0.5})
    repo.create_branch("side", c1.hex())
    c4 = _commit(repo, {"a.txt": b"4"}, "side", branch="side", metrics={"acc": 0.95})
    repo.tag("t1", c1.hex(), metrics={"bleu": 30.0})
    assert best_commit(repo, "acc").commit_id == c2
    assert best_commit(repo, "acc", "min").commit_id == c1
    assert best_commit(repo, "loss", "min").commit_id == c3
    assert best_commit(repo, "acc", rev=None).commit_id == c4
    best = best_commit(repo, "bleu")
    assert best.commit_id == c1 and best.source == "tag t1" and best.value == 30.0
    assert best_commit(repo, "nothing") is None
    assert cli.main(["-R", repo.root, "best", "--metric", "acc", "--mode", "max"]) == 0
    assert capsys.readouterr().out.startswith(c2.hex()[:12] + " acc=0.9")
    assert cli.main(["-R", repo.root, "best", "--metric", "acc", "--all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == c4.hex()
    assert cli.main(["-R", repo.root, "best", "--metric", "nothing"]) == 3


def test_raw_safetensors_bytes_file_is_not_a_checkpoint(repo):
    good = st_save({"x": torch.ones(4)})
    _commit(repo, {"m.safetensors": good}, "one")
    _commit(repo, {"m.safetensors": b"garbage, not safetensors"}, "two")
    (f,) = diff(repo, "HEAD~1", "HEAD").files
    assert f.kind == "file" and f.status == "changed" and "checkpoint on one side only" in f.note
