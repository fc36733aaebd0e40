"""Three-way tensor-aware merge on small, really trained models."""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import load as st_load  # noqa: E402

from coralfs import cli  # noqa: E402
from coralfs.errors import (  # noqa: E402
    CheckpointLoadError,  # noqa: E402
    MergeConflict,
    WouldOverwrite,
)
from coralfs.merge import MergeOptions, is_ancestor, merge, merge_base, merge_bases  # noqa: E402
from coralfs.repository import Repository  # noqa: E402
from coralfs.store.objects import TreeEntry  # noqa: E402
from tests.factories import TinyNet, train_steps  # noqa: E402

ONLY_OURS = ["fc1.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]
ONLY_THEIRS = ["emb.weight"]
BOTH = ["fc2.weight", "fc2.bias"]
NEITHER = ["fc1.bias"]


def _clone(sd: dict) -> dict:
    return {k: v.clone() for k, v in sd.items()}


@functools.cache
def _models() -> tuple[dict, dict, dict]:
    """(base, ours, theirs) state dicts of real SGD fine-tunes of one base model.

    ours trains fc1.weight, bn and fc2 (bn in train mode); theirs trains emb and fc2 (bn
    frozen, eval). So fc2 changes on both sides, fc1.bias on neither."""
    torch.manual_seed(0)
    m = TinyNet()
    train_steps(m, torch.optim.SGD(m.parameters(), lr=0.1), 2, seed=0)
    base = _clone(m.state_dict())

    def finetune(trainable: list[str], bn_train: bool, seed: int) -> dict:
        net = TinyNet()
        net.load_state_dict(base)
        for n, p in net.named_parameters():
            p.requires_grad_(any(n.startswith(t) for t in trainable))
        net.train()
        net.bn.train(bn_train)
        train_steps(net, torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1), 3, seed=seed)
        return _clone(net.state_dict())

    ours = finetune(["fc1.weight", "bn.", "fc2."], True, 1)
    theirs = finetune(["emb.", "fc2."], False, 2)
    return base, ours, theirs


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _entry(repo: Repository, obj, path: str, metadata=None) -> TreeEntry:
    if isinstance(obj, bytes):
        with repo.writing():
            mid, man, _ = repo.ingest_buffer(memoryview(obj), path)
        return TreeEntry(mid, man.size)
    return repo.save(obj, path, stage=False, metadata=metadata)


def _setup(repo: Repository, base_files: dict, ours_files: dict, theirs_files: dict) -> tuple[bytes, bytes, bytes]:
    b = repo.commit_changes("main", {p: _entry(repo, o, p) for p, o in base_files.items()}, "base")
    repo.create_branch("exp", b.hex())
    t = repo.commit_changes("exp", {p: _entry(repo, o, p) if o is not None else None
                                    for p, o in theirs_files.items()}, "theirs", expected_head=b)
    o = repo.commit_changes("main", {p: _entry(repo, x, p) if x is not None else None
                                     for p, x in ours_files.items()}, "ours", expected_head=b)
    return b, o, t


def _wrap(sd: dict, fmt: str, step: int):
    return {"model": sd, "step": step} if fmt == "pt" else sd


def _load(repo: Repository, rev: str, path: str) -> dict:
    with repo.open(rev, path) as f:
        data = f.read()
    if path.endswith(".safetensors"):
        return st_load(data)
    return torch.load(io.BytesIO(data), weights_only=True)


def _forward(sd: dict) -> torch.Tensor:
    net = TinyNet()
    net.load_state_dict(sd, strict=True)
    net.eval()
    out = net(torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0)))
    assert out.shape == (4, 4) and torch.isfinite(out).all()
    return out


def _ties_reference(b, o, t, density, lam):
    b, o, t = (x.double().numpy().reshape(-1) for x in (b, o, t))
    taus = []
    for tau in (o - b, t - b):
        k = max(1, math.ceil(density * tau.size))
        keep = np.zeros(tau.size, dtype=bool)
        keep[np.argsort(-np.abs(tau), kind="stable")[:k]] = True
        taus.append(np.where(keep, tau, 0.0))
    st = np.stack(taus)
    sign = np.sign(st.sum(0))
    agree = (np.sign(st) == sign) & (st != 0)
    cnt = agree.sum(0)
    merged = np.where(cnt > 0, (st * agree).sum(0) / np.maximum(cnt, 1), 0.0)
    return b + lam * merged


# ------------------------------------------------------------------ commit DAG
def test_merge_base_ancestry_and_fast_forward(repo):
    c1 = repo.commit_changes("main", {"a.txt": _entry(repo, b"1", "a.txt")}, "1")
    repo.create_branch("x", c1.hex())
    c2 = repo.commit_changes("x", {"b.txt": _entry(repo, b"2", "b.txt")}, "2")
    c3 = repo.commit_changes("main", {"c.txt": _entry(repo, b"3", "c.txt")}, "3")
    assert merge_base(repo, c2, c3) == c1 and merge_bases(repo, c3, c2) == [c1]
    assert is_ancestor(repo, c1, c3) and not is_ancestor(repo, c2, c3)
    # ff: y is behind x
    repo.create_branch("y", c1.hex())
    res = merge(repo, "x", "y")
    assert res.status == "fast-forward" and repo.branch_head("y") == c2
    assert merge(repo, "main", "main").status == "up-to-date"
    assert merge(repo, c1.hex(), "x").status == "up-to-date"
    m = merge(repo, "x", "main")
    assert m.status == "merged" and repo.get_commit(m.commit).parents == (c3, c2)
    assert set(repo.ls("main")) == {"a.txt", "b.txt", "c.txt"}
    assert merge_base(repo, m.commit, c2) == c2
    nf = merge(repo, "main", "y", fast_forward=False)  # y == c2 is an ancestor of main: --no-ff makes a commit
    assert nf.status == "merged" and repo.get_commit(nf.commit).parents == (c2, m.commit)


# ------------------------------------------------------------------ one-sided changes
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_one_sided_changes_merge_cleanly_bit_identical(repo, fmt):
    base, ours, theirs = _models()
    o = _clone(base)
    for k in ONLY_OURS:
        o[k] = ours[k]
    t = _clone(base)
    for k in ONLY_THEIRS:
        t[k] = theirs[k]
    path = f"model.{fmt}"
    _, co, ct = _setup(repo, {path: _wrap(base, fmt, 2), "config.json": b"{}"},
                       {path: _wrap(o, fmt, 2)}, {path: _wrap(t, fmt, 2), "config.json": b'{"x": 1}'})
    res = merge(repo, "exp", "main")
    assert res.status == "merged" and not res.resolved
    c = repo.get_commit(res.commit)
    assert c.parents == (co, ct)
    assert repo.cat("main", "config.json", io.BytesIO()) == 8
    got = _load(repo, "main", path)
    sd = got["model"] if fmt == "pt" else got
    assert list(sd) == list(base) if fmt == "pt" else set(sd) == set(base)
    for k in base:
        src = theirs if k in ONLY_THEIRS else ours if k in ONLY_OURS else base
        assert _bits(sd[k]) == _bits(src[k]) and sd[k].dtype == src[k].dtype, k
    _forward(sd)


def test_same_change_on_both_sides_and_reused_entry(repo):
    base, ours, theirs = _models()
    o = _clone(base)
    o["fc2.weight"] = ours["fc2.weight"]
    o["fc1.weight"] = ours["fc1.weight"]
    t = _clone(base)
    t["fc2.weight"] = ours["fc2.weight"]  # the same change
    _setup(repo, {"m.safetensors": base, "m.pt": base}, {"m.safetensors": o, "m.pt": o},
           {"m.safetensors": t, "m.pt": t})
    ours_entries = repo.ls("main")
    res = merge(repo, "exp", "main")
    assert res.status == "merged"
    # every tensor of the result is ours: ours' entries are reused as they are (no re-encoding)
    assert repo.ls("main") == ours_entries


# ------------------------------------------------------------------ conflicts
def test_conflicts_are_listed_and_nothing_changes(repo):
    base, ours, theirs = _models()
    _, co, _ = _setup(repo, {"model.pt": _wrap(base, "pt", 2), "m.safetensors": base, "config.json": b"{}"},
                      {"model.pt": _wrap(ours, "pt", 4), "m.safetensors": ours, "config.json": b'{"a": 1}'},
                      {"model.pt": _wrap(theirs, "pt", 5), "m.safetensors": theirs, "config.json": b'{"a": 2}'})
    with pytest.raises(MergeConflict) as ei:
        merge(repo, "exp", "main")
    conflicts = {(c.path, c.name) for c in ei.value.conflicts}
    assert conflicts == {("model.pt", "model.fc2.weight"), ("model.pt", "model.fc2.bias"),
                         ("m.safetensors", "fc2.weight"), ("m.safetensors", "fc2.bias"), ("config.json", None)}
    assert "not a checkpoint" in str(ei.value) and "main is unchanged" in str(ei.value)
    assert repo.branch_head("main") == co and len(repo.log("main")) == 2
    # tensor strategies leave the whole-file conflict; a file rule resolves it
    with pytest.raises(MergeConflict) as ei:
        merge(repo, "exp", "main", MergeOptions("average"))
    assert {(c.path, c.name) for c in ei.value.conflicts} == {("config.json", None)}
    res = merge(repo, "exp", "main", MergeOptions("average", rules=(("config.json", "theirs"),)))
    assert repo.cat("main", "config.json", io.BytesIO()) == len(b'{"a": 2}')
    assert any("step" in n and "kept ours" in n for n in res.notes)
    assert _load(repo, "main", "model.pt")["step"] == 4


def test_mismatched_shapes_are_conflicts_never_broadcast(repo):
    base, ours, theirs = _models()
    o = _clone(base)
    o["emb.weight"] = torch.cat([ours["emb.weight"], torch.zeros(1, 32)])  # [65, 32]
    t = _clone(base)
    t["emb.weight"] = theirs["emb.weight"]
    _setup(repo, {"m.safetensors": base}, {"m.safetensors": o}, {"m.safetensors": t})
    for strategy in ("average", "task-arithmetic", "ties", None):
        with pytest.raises(MergeConflict) as ei:
            merge(repo, "exp", "main", MergeOptions(strategy))
        (c,) = ei.value.conflicts
        assert c.name == "emb.weight" and ("shape" in c.reason)
    merge(repo, "exp", "main", MergeOptions("ours"))
    assert _load(repo, "main", "m.safetensors")["emb.weight"].shape == (65, 32)


def test_deleted_vs_changed_is_a_conflict(repo):
    base, ours, theirs = _models()
    o = _clone(base)
    del o["fc2.bias"]
    t = _clone(base)
    t["fc2.bias"] = theirs["fc2.bias"]
    _setup(repo, {"m.safetensors": base}, {"m.safetensors": o}, {"m.safetensors": t})
    with pytest.raises(MergeConflict, match="deleted on one side"):
        merge(repo, "exp", "main", MergeOptions("average"))
    merge(repo, "exp", "main", MergeOptions(rules=(("fc2.*", "theirs"),)))
    assert _bits(_load(repo, "main", "m.safetensors")["fc2.bias"]) == _bits(theirs["fc2.bias"])


# ------------------------------------------------------------------ strategies
def _expected(strategy: str, b, o, t, opts: MergeOptions) -> torch.Tensor:
    if strategy == "ours":
        return o
    if strategy == "theirs":
        return t
    if strategy == "average":
        r = o.double() * (1 - opts.weight) + t.double() * opts.weight
    elif strategy == "task-arithmetic":
        r = b.double() + opts.lam * ((o.double() - b.double()) + (t.double() - b.double()))
    else:
        r = torch.from_numpy(_ties_reference(b, o, t, opts.density, opts.lam)).reshape(o.shape)
    return r.to(o.dtype)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("strategy", ["ours", "theirs", "average", "task-arithmetic", "ties"])
def test_every_strategy_on_real_models(repo, fmt, strategy):
    base, ours, theirs = _models()
    path = f"model.{fmt}"
    _setup(repo, {path: _wrap(base, fmt, 2)}, {path: _wrap(ours, fmt, 5)}, {path: _wrap(theirs, fmt, 5)})
    opts = MergeOptions(strategy, weight=0.3, lam=0.8, density=0.3)
    res = merge(repo, "exp", "main", opts)
    assert {r.name.removeprefix("model.") for r in res.resolved} == set(BOTH)
    got = _load(repo, "main", path)
    sd = got["model"] if fmt == "pt" else got
    for k in ONLY_OURS:
        assert _bits(sd[k]) == _bits(ours[k]), k
    for k in ONLY_THEIRS:
        assert _bits(sd[k]) == _bits(theirs[k]), k
    for k in NEITHER:
        assert _bits(sd[k]) == _bits(base[k]), k
    for k in BOTH:
        exp = _expected(strategy, base[k], ours[k], theirs[k], opts)
        if strategy in ("ours", "theirs"):
            assert _bits(sd[k]) == _bits(exp), k
        else:
            assert sd[k].dtype == exp.dtype and sd[k].shape == exp.shape
            torch.testing.assert_close(sd[k], exp, rtol=1e-5, atol=1e-6)
            assert not torch.equal(sd[k], ours[k]) and not torch.equal(sd[k], theirs[k])
    if fmt == "pt":
        assert got["step"] == 5
    _forward(sd)


def test_bf16_and_int_arithmetic_cast_back(repo):
    base, ours, theirs = _models()
    pick = ["fc2.weight", "bn.num_batches_tracked"]
    b = {k: base[k].bfloat16() if k == "fc2.weight" else base[k] for k in pick}
    o = {k: ours[k].bfloat16() if k == "fc2.weight" else ours[k] for k in pick}
    t = {k: theirs[k].bfloat16() if k == "fc2.weight" else theirs[k] + 3 for k in pick}
    _setup(repo, {"m.safetensors": b}, {"m.safetensors": o}, {"m.safetensors": t})
    merge(repo, "exp", "main", MergeOptions("average"))
    got = _load(repo, "main", "m.safetensors")
    assert got["fc2.weight"].dtype == torch.bfloat16
    exp = ((o["fc2.weight"].float() + t["fc2.weight"].float()) / 2).bfloat16()
    assert _bits(got["fc2.weight"]) == _bits(exp)
    nbt = (o["bn.num_batches_tracked"] + t["bn.num_batches_tracked"]).double() / 2
    assert got["bn.num_batches_tracked"].dtype == torch.int64
    assert int(got["bn.num_batches_tracked"]) == int(torch.round(nbt))


def test_strategy_rules_per_tensor_pattern(repo):
    base, ours, theirs = _models()
    _setup(repo, {"m.safetensors": base}, {"m.safetensors": ours}, {"m.safetensors": theirs})
    merge(repo, "exp", "main", MergeOptions("average", rules=(("*.bias", "theirs"),)))
    got = _load(repo, "main", "m.safetensors")
    assert _bits(got["fc2.bias"]) == _bits(theirs["fc2.bias"])
    torch.testing.assert_close(got["fc2.weight"], (ours["fc2.weight"] + theirs["fc2.weight"]) / 2)


def test_safetensors_metadata_merges_three_way(repo):
    base, ours, theirs = _models()
    b = _entry(repo, base, "m.safetensors", {"format": "pt", "a": "1"})
    c0 = repo.commit_changes("main", {"m.safetensors": b}, "base")
    repo.create_branch("exp", c0.hex())
    repo.commit_changes("exp", {"m.safetensors": _entry(repo, {**base, "emb.weight": theirs["emb.weight"]},
                                                          "m.safetensors", {"format": "pt", "a": "1", "t": "x"})}, "t")
    repo.commit_changes("main", {"m.safetensors": _entry(repo, {**base, "fc1.weight": ours["fc1.weight"]},
                                                          "m.safetensors", {"format": "pt", "a": "2"})}, "o")
    merge(repo, "exp", "main")
    with repo.open("main", "m.safetensors") as f:
        data = f.read()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    assert header["__metadata__"] == {"format": "pt", "a": "2", "t": "x"}


# ------------------------------------------------------------------ nothing is lost
def test_merge_never_loses_the_other_sides_changes_fresh_reader(repo):
    """Nested training checkpoints; tensors changed only on theirs are checked through a fresh
    Repository without a chunk cache (nothing the merge decoded is reused: the stored bytes)."""
    base, ours, theirs = _models()

    def ckpt(model: dict, exp_avg: dict, step: int) -> dict:
        return {"model": model, "optimizer": {"state": {i: {"momentum_buffer": v} for i, v in exp_avg.items()},
                                              "param_groups": [{"lr": 0.1, "params": list(range(3))}]},
                "step": step}

    mom = {i: torch.full((8,), float(i)) for i in range(3)}
    o_model = {**base, **{k: ours[k] for k in ONLY_OURS}}
    t_model = {**base, **{k: theirs[k] for k in ONLY_THEIRS}}
    t_mom = {**mom, 2: torch.randn(8)}
    _setup(repo, {"ckpt.pt": ckpt(base, mom, 2)}, {"ckpt.pt": ckpt(o_model, mom, 2)},
           {"ckpt.pt": ckpt(t_model, t_mom, 3)})
    merge(repo, "exp", "main")
    expected = {f"model.{k}": theirs[k] for k in ONLY_THEIRS}
    expected["optimizer.state.2.momentum_buffer"] = t_mom[2]
    expected.update({f"model.{k}": ours[k] for k in ONLY_OURS})
    with Repository(repo.root, cache_bytes=0) as fresh, fresh.open("main", "ckpt.pt") as f:
        got = torch.load(io.BytesIO(f.read()), weights_only=True)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, x: object) -> None:
        if isinstance(x, torch.Tensor):
            flat[prefix] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}.{i}", v)

    walk("", got)
    lost = [n for n, v in expected.items() if n not in flat or flat[n].dtype != v.dtype
            or _bits(flat[n]) != _bits(v)]
    assert lost == [] and got["step"] == 3


# ------------------------------------------------------------------ bad input
def test_weights_only_failure_names_the_file(repo):
    base, ours, theirs = _models()

    def ck(sd):
        return {"model": sd, "args": argparse.Namespace(lr=0.1)}  # an arbitrary object

    _setup(repo, {"bad.pt": ck(base)}, {"bad.pt": ck({**base, "fc1.weight": ours["fc1.weight"]})},
           {"bad.pt": ck({**base, "emb.weight": theirs["emb.weight"]})})
    head = repo.branch_head("main")
    with pytest.raises(CheckpointLoadError, match=r"bad\.pt.*weights-only"):
        merge(repo, "exp", "main")
    assert repo.branch_head("main") == head


# ------------------------------------------------------------------ CLI
def test_cli_merge_work_tree_and_conflicts(repo, capsys, monkeypatch):
    base, ours, theirs = _models()
    monkeypatch.chdir(repo.root)
    _setup(repo, {"model.pt": base}, {"model.pt": ours}, {"model.pt": theirs})
    repo.checkout("main", force=True)
    rc = cli.main(["merge", "exp"])
    o = capsys.readouterr()
    assert rc == 8 and "CONFLICT model.pt [fc2.weight]: changed on both sides" in o.out
    assert "merge conflict" in o.err
    with open("model.pt", "ab") as f:  # a dirty work tree is refused
        f.write(b"x")
    assert cli.main(["merge", "exp", "--strategy", "ties", "--density", "0.5"]) == WouldOverwrite.exit_code
    repo.checkout("main", force=True)
    rc = cli.main(["merge", "exp", "--strategy", "ties", "--density", "0.5", "--lambda", "1.0", "-m", "merge it"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Merged exp into main" in out and "2 ties" in out
    assert repo.status().clean and repo.current_branch() == "main"
    with open("model.pt", "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == hashlib.sha256(_read(repo, "main", "model.pt")).hexdigest()
    assert repo.get_commit(repo.head()).message == "merge it"
    assert cli.main(["merge", "exp"]) == 0 and "Already up to date" in capsys.readouterr().out
    assert cli.main(["merge", "exp", "--strategy-for", "nonsense"]) == 2


def _read(repo: Repository, rev: str, path: str) -> bytes:
    with repo.open(rev, path) as f:
        return f.read()


def test_pt_shared_storages_views_and_nested_values(repo):
    """A storage shared by views is one unit: a change through any view conflicts with a direct change."""
    from tests.factories import varied_state_dict

    base, o, t = varied_state_dict(), varied_state_dict(), varied_state_dict()
    o["f32"].add_(1.0)  # "transposed" and "strided" view this storage
    t["transposed"].add_(0.5)
    t["view_a"].mul_(2)  # shared with view_b
    t["nested"]["list"][1]["deep"] += 3
    t["nested"]["s"] = "changed"
    _setup(repo, {"v.pt": base}, {"v.pt": o}, {"v.pt": t})
    with pytest.raises(MergeConflict) as ei:
        merge(repo, "exp", "main")
    assert [(c.path, c.name) for c in ei.value.conflicts] == [("v.pt", "f32")]
    merge(repo, "exp", "main", MergeOptions("average"))
    got = _load(repo, "main", "v.pt")
    assert got["view_a"].untyped_storage().data_ptr() == got["view_b"].untyped_storage().data_ptr()
    assert _bits(got["view_b"]) == _bits(t["view_b"]) and _bits(got["i8"]) == _bits(base["i8"])
    assert _bits(got["nested"]["list"][1]["deep"]) == _bits(t["nested"]["list"][1]["deep"])
    assert got["nested"]["s"] == "changed" and got["nested"]["n"] == 5
    torch.testing.assert_close(got["f32"], (o["f32"] + t["f32"]) / 2)
    assert torch.equal(got["transposed"], got["f32"].t()) and torch.equal(got["strided"], got["f32"][:, ::2])


def test_content_on_one_side_mode_on_the_other(repo):
    from coralfs.store.objects import MODE_EXEC

    b = _entry(repo, b"#!/bin/sh\necho 1\n", "run.sh")
    c0 = repo.commit_changes("main", {"run.sh": b}, "base")
    repo.create_branch("exp", c0.hex())
    repo.commit_changes("exp", {"run.sh": TreeEntry(b.manifest, b.size, MODE_EXEC)}, "chmod +x")
    new = _entry(repo, b"#!/bin/sh\necho 2\n", "run.sh")
    repo.commit_changes("main", {"run.sh": new}, "edit")
    merge(repo, "exp", "main")
    assert repo.entry("main", "run.sh") == TreeEntry(new.manifest, new.size, MODE_EXEC)


# ------------------------------------------------------------------ torch.save zips written outside coralfs
def _pt_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_torch_zip_versions_merge_key_by_key_across_dict_types(repo):
    """ours is an OrderedDict state_dict(), theirs a plain dict re-saved by another script: the merge
    used to treat the whole root as one value and keep ours, silently dropping theirs' fc1 change."""
    import collections

    base, ours, theirs = _models()
    o = collections.OrderedDict((k, v.clone()) for k, v in ours.items())
    t = {k: v.clone() for k, v in theirs.items()}
    _setup(repo, {"model.pt": _pt_bytes(collections.OrderedDict(base))}, {"model.pt": _pt_bytes(o)},
           {"model.pt": _pt_bytes(t)})
    res = merge(repo, "exp", "main", MergeOptions("average"))
    assert {r.name for r in res.resolved} == set(BOTH) and not res.notes
    got = _load(repo, "main", "model.pt")
    assert isinstance(got, collections.OrderedDict) and list(got) == list(ours)
    for k in ONLY_OURS:
        assert _bits(got[k]) == _bits(ours[k]), k
    for k in ONLY_THEIRS:
        assert _bits(got[k]) == _bits(theirs[k]), k  # lost before
    for k in NEITHER:
        assert _bits(got[k]) == _bits(base[k]), k
    for k in BOTH:
        torch.testing.assert_close(got[k], (ours[k] + theirs[k]) / 2)
    _forward(got)


@pytest.mark.parametrize("case", ["list-lengths", "tensor-vs-value", "container-vs-tensor"])
def test_torch_zip_changes_that_cannot_pair_up_are_conflicts(repo, case):
    """Both sides changed a tensor-holding value in ways no tensor-by-tensor merge can pair up: a clear
    MergeConflict naming the file and the value (it used to keep ours, with only a note), settled
    only by an explicit ours/theirs rule."""
    base, ours, theirs = _models()
    w = base["fc2.weight"]
    if case == "list-lengths":
        b, o, t = [w, base["fc2.bias"]], [w + 1, base["fc2.bias"]], [w, base["fc2.bias"], torch.ones(3)]
        name = "(root)"
    elif case == "tensor-vs-value":
        b, o, t = {"w": w, "extra": 1}, {"w": w, "extra": 2}, {"w": w, "extra": torch.ones(2)}
        name = "extra"
    else:
        b, o, t = {"w": w, "x": [w]}, {"w": w, "x": [w * 2, w]}, {"w": w, "x": w * 3}
        name = "x"
    _, co, _ = _setup(repo, {"v.pt": _pt_bytes(b)}, {"v.pt": _pt_bytes(o)}, {"v.pt": _pt_bytes(t)})
    for strategy in ("average", "task-arithmetic", "ties", None):
        with pytest.raises(MergeConflict) as ei:
            merge(repo, "exp", "main", MergeOptions(strategy))
        assert [(c.path, c.name) for c in ei.value.conflicts] == [("v.pt", name)], ei.value.conflicts
        assert "holds tensors" in str(ei.value) and "v.pt" in str(ei.value)
        assert repo.branch_head("main") == co
    merge(repo, "exp", "main", MergeOptions("average", rules=((name, "theirs"),)))
    got = _load(repo, "main", "v.pt")
    exp = t if name == "(root)" else t[name]
    if isinstance(exp, list):
        assert len(got) == len(exp) and all(torch.equal(a, c) for a, c in zip(got, exp, strict=True))
    else:
        assert torch.equal(got if name == "(root)" else got[name], exp)


def test_torch_zip_of_one_tensor_merges(repo):
    """torch.save(tensor): the storage is named by its key ('0'); the merge pairs it with the loaded tensor."""
    torch.manual_seed(0)
    b = torch.randn(16, 8)
    o, t = b + 1, b * 3
    _setup(repo, {"t.pt": _pt_bytes(b)}, {"t.pt": _pt_bytes(o)}, {"t.pt": _pt_bytes(t)})
    merge(repo, "exp", "main", MergeOptions("average"))
    got = _load(repo, "main", "t.pt")
    assert isinstance(got, torch.Tensor) and got.shape == b.shape
    assert _bits(got) == _bits((o * 0.5 + t * 0.5).float())


def test_cli_merge_of_torch_zips_refuses_clearly(tmp_path, cli, monkeypatch):
    """Through the CLI: exit 8, the file and the value named, the branch and work tree unchanged."""
    root = tmp_path / "r"
    monkeypatch.setenv("CORALFS_AUTO_REPACK", "0")

    def cli_run(*args):
        rc, out, err = cli(*args, cwd=root)
        return rc, out + err

    base, ours, theirs = _models()
    ours_bytes = _pt_bytes({"model": ours, "extra": 2})
    with Repository.init(root) as repo:  # set up through the API: only the merges are under test
        (root / "model.pt").write_bytes(_pt_bytes({"model": base, "extra": 1}))
        repo.add([root / "model.pt"])
        repo.commit("base")
        repo.create_branch("exp")
        repo.checkout("exp")
        (root / "model.pt").write_bytes(_pt_bytes({"model": theirs, "extra": torch.ones(2)}))
        repo.add([root / "model.pt"])
        repo.commit("theirs")
        repo.checkout("main")
        (root / "model.pt").write_bytes(ours_bytes)
        repo.add([root / "model.pt"])
        repo.commit("ours")
    rc, out = cli_run("merge", "exp", "--strategy", "average")
    assert rc == 8 and "model.pt [extra]" in out and "holds tensors" in out, out
    assert _sha((root / "model.pt").read_bytes()) == _sha(ours_bytes)
    rc, out = cli_run("merge", "exp", "--strategy", "average", "--strategy-for", "extra=theirs")
    assert rc == 0, out
    got = torch.load(root / "model.pt", weights_only=True)
    assert torch.equal(got["extra"], torch.ones(2))
    assert _bits(got["model"]["emb.weight"]) == _bits(theirs["emb.weight"])
    assert _bits(got["model"]["fc1.weight"]) == _bits(ours["fc1.weight"])
    torch.testing.assert_close(got["model"]["fc2.weight"], (ours["fc2.weight"] + theirs["fc2.weight"]) / 2)
