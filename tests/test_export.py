"""Format export (.pt <-> safetensors, bit-identical tensors) and one-commit import of a model directory."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load as st_load  # noqa: E402
from safetensors.torch import save as st_save  # noqa: E402

from coralfs import cli  # noqa: E402
from coralfs.errors import (  # noqa: E402
    CheckpointLoadError,  # noqa: E402
    CoralError,
    NothingToCommit,
)
from coralfs.export import export_bytes, export_file, import_dir  # noqa: E402
from coralfs.repository import Repository  # noqa: E402
from tests.factories import training_series, varied_state_dict  # noqa: E402


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _flat(obj, prefix: str = "") -> dict:
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_flat(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def _commit(repo: Repository, objs: dict, msg: str = "c") -> bytes:
    return repo.commit_changes("main", {p: repo.save(o, p, stage=False) for p, o in objs.items()}, msg)


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ------------------------------------------------------------------ export
def test_pt_to_safetensors_is_bit_identical_with_views_and_scalars(repo):
    sd = varied_state_dict()
    _commit(repo, {"v.pt": sd})
    data, res = export_bytes(repo, "HEAD", "v.pt", "safetensors")
    got = st_load(data)
    exp = _flat(sd)
    assert set(got) == set(exp) and res.tensors == len(exp)
    for k, v in exp.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert _bits(got[k]) == _bits(v), k
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert header["__metadata__"] == {"nested.n": "5", "nested.s": '"text"', "format": "pt"}
    with pytest.raises(CoralError, match=r"nested\.n.*nested\.s|nested\.s.*nested\.n"):
        export_bytes(repo, "HEAD", "v.pt", "safetensors", strict=True)


def test_training_checkpoint_round_trip_pt_safetensors_pt(repo, tmp_path):
    ck = training_series(1)[0]  # model + AdamW state + step
    _commit(repo, {"ckpt.pt": ck})
    out = tmp_path / "ckpt.safetensors"
    res = export_file(repo, "HEAD", "ckpt.pt", out)
    assert res.format == "safetensors" and res.output == str(out)
    st = st_load(out.read_bytes())
    assert "optimizer.state.0.exp_avg" in st and "model.fc1.weight" in st
    meta = res.metadata
    assert json.loads(meta["step"]) == 3 and json.loads(meta["optimizer.param_groups"])[0]["lr"] == 0.01
    # back: commit the safetensors file, export it as a .pt state dict
    c = repo.commit_changes("main", {"ckpt.safetensors": repo.ingest_file(out, "ckpt.safetensors")[0]}, "st")
    assert repo.get_manifest(repo.entry(c, "ckpt.safetensors").manifest).format == "safetensors"
    data, back = export_bytes(repo, "HEAD", "ckpt.safetensors", "pt")
    assert back.dropped_metadata == meta
    sd = torch.load(io.BytesIO(data), weights_only=True)
    exp = _flat(ck)
    assert list(sd) == list(st_load(out.read_bytes()).keys()) or set(sd) == set(exp)
    assert set(sd) == set(exp)
    for k, v in exp.items():
        assert _bits(sd[k]) == _bits(v) and sd[k].dtype == v.dtype, k


def test_same_format_export_copies_bytes_and_cli(repo, tmp_path, capsys):
    sd = training_series(1)[0]["model"]
    _commit(repo, {"m.pt": sd, "m.safetensors": sd})
    for path in ("m.pt", "m.safetensors"):
        out = tmp_path / f"copy-{path}"
        res = export_file(repo, "HEAD", path, out)
        assert res.copied
        with repo.open("HEAD", path) as f:
            assert _sha(out.read_bytes()) == _sha(f.read())
    out = tmp_path / "x.pt"
    assert cli.main(["-R", repo.root, "export", "HEAD:m.safetensors", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "pt" and doc["tensors"] == len(sd)
    back = torch.load(out, weights_only=True)
    assert all(_bits(back[k]) == _bits(v) for k, v in sd.items())
    assert cli.main(["-R", repo.root, "export", "m.pt", str(tmp_path / "y.bin"), "--format", "safetensors"]) == 0
    assert set(st_load((tmp_path / "y.bin").read_bytes())) == set(sd)


def test_weights_only_failure_names_the_file(repo, tmp_path, capsys):
    _commit(repo, {"evil.pt": {"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}})
    with pytest.raises(CheckpointLoadError, match=r"HEAD:evil\.pt: not loadable with torch's weights-only"):
        export_bytes(repo, "HEAD", "evil.pt", "safetensors")
    rc = cli.main(["-R", repo.root, "export", "HEAD:evil.pt", str(tmp_path / "e.safetensors")])
    err = capsys.readouterr().err
    assert rc == CheckpointLoadError.exit_code and "evil.pt" in err and "weights-only" in err
    assert not (tmp_path / "e.safetensors").exists()


# ------------------------------------------------------------------ import
def _hf_dir(root, scale: float = 1.0) -> dict[str, bytes]:
    torch.manual_seed(0)
    shard1 = {f"layers.{i}.weight": torch.randn(16, 16) * scale for i in range(2)}
    shard2 = {f"layers.{i}.weight": torch.randn(16, 16) * scale for i in range(2, 4)}
    files = {
        "config.json": json.dumps({"model_type": "tiny", "hidden_size": 16}).encode(),
        "tokenizer.json": json.dumps({"vocab": {"a": 0, "b": 1}}).encode(),
        "tokenizer_config.json": b'{"model_max_length": 8}',
        "model-00001-of-00002.safetensors": st_save(shard1, metadata={"format": "pt"}),
        "model-00002-of-00002.safetensors": st_save(shard2, metadata={"format": "pt"}),
        "model.safetensors.index.json": json.dumps({"weight_map": {
            **{k: "model-00001-of-00002.safetensors" for k in shard1},
            **{k: "model-00002-of-00002.safetensors" for k in shard2}}}).encode(),
        "nested/readme.md": b"# tiny\n",
    }
    for p, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, p)) or root, exist_ok=True)
        with open(os.path.join(root, p), "wb") as f:
            f.write(data)
    return files


def test_import_hf_folder_in_one_commit(repo, tmp_path):
    src = tmp_path / "hf"
    files = _hf_dir(src)
    os.makedirs(src / ".git")
    (src / ".git" / "HEAD").write_bytes(b"ref")
    before = len(repo.commits())
    res = import_dir(repo, src, branch="main", message="tiny model")
    assert len(repo.commits()) == before + 1 and repo.branch_head("main") == res.commit
    assert sorted(res.added) == sorted(files) and repo.get_commit(res.commit).message == "tiny model"
    assert set(repo.ls("main")) == set(files)  # .git skipped
    for p, data in files.items():
        with repo.open("main", p) as f:
            assert _sha(f.read()) == _sha(data), p
    man = repo.get_manifest(repo.entry("main", "model-00001-of-00002.safetensors").manifest)
    assert man.format == "safetensors" and len(man.tensors()) == 2
    assert not os.path.exists(os.path.join(repo.root, "config.json"))  # the work tree is not used
    with pytest.raises(NothingToCommit):
        import_dir(repo, src, branch="main")
    # change a shard, drop a file: one commit with exactly that
    files2 = _hf_dir(src, scale=2.0)
    os.unlink(src / "nested" / "readme.md")
    res2 = import_dir(repo, src, branch="main", delete=True)
    assert res2.modified == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert res2.deleted == ["nested/readme.md"] and repo.get_commit(res2.commit).parents == (res.commit,)
    with repo.open("main", "model-00001-of-00002.safetensors") as f:
        assert _sha(f.read()) == _sha(files2["model-00001-of-00002.safetensors"])
    # a prefix, on a new branch that starts at HEAD; a symlink is skipped (not stored, not followed)
    os.symlink(src / "config.json", src / "link.json")
    res3 = import_dir(repo, src, branch="models", prefix="hf/tiny")
    assert repo.get_commit(res3.commit).parents == (res2.commit,)
    assert "hf/tiny/link.json" not in repo.ls("models") and "config.json" in repo.ls("models")
    assert [p for p, _ in res3.skipped] == ["link.json"]
    orphan = import_dir(repo, src, branch="bare", orphan=True, exclude=(".git", "*.json"))
    assert repo.get_commit(orphan.commit).parents == () and all(p.endswith(".safetensors")
                                                                for p in repo.ls("bare"))


def test_cli_import_into_checked_out_branch_updates_work_tree(repo, tmp_path, capsys, monkeypatch):
    src = tmp_path / "hf"
    files = _hf_dir(src)
    monkeypatch.chdir(repo.root)
    assert cli.main(["import", str(src), "-m", "import", "--metric", "ppl=3.5"]) == 0  # unborn main
    assert "7 added" in capsys.readouterr().out
    assert repo.get_commit(repo.head()).metrics == {"ppl": 3.5}
    for p, data in files.items():
        with open(p, "rb") as f:
            assert f.read() == data
    assert repo.status().clean
    files2 = _hf_dir(src, scale=3.0)
    assert cli.main(["import", str(src), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["modified"]) == 2 and repo.status().clean and repo.current_branch() == "main"
    with open("model-00002-of-00002.safetensors", "rb") as f:
        assert f.read() == files2["model-00002-of-00002.safetensors"]
    assert len(repo.log("main")) == 2
