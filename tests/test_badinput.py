"""Bad input gets a clear error or is stored as plain bytes, and never corrupts the repository."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from coralfs.errors import InvalidPath, PathNotFound
from coralfs.formats import split
from coralfs.repository import Repository
from tests.factories import TinyNet, save_pt, sha256


def _roundtrip(repo: Repository, name: str, data: bytes) -> str:
    p = os.path.join(repo.root, name)
    with open(p, "wb") as f:
        f.write(data)
    repo.add([p])
    repo.commit(name)
    assert sha256(repo.open("HEAD", name).read()) == sha256(data)
    return repo.get_manifest(repo.entry("HEAD", name).manifest).format


def _pt_bytes() -> bytes:
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(TinyNet().state_dict(), buf)
    return buf.getvalue()


def test_truncated_and_corrupt_torch_zip(repo):
    data = _pt_bytes()
    assert _roundtrip(repo, "trunc.pt", data[: len(data) // 2]) == "bytes"
    bad = bytearray(data)
    bad[-10:] = b"\xff" * 10  # clobber the end of central directory
    assert _roundtrip(repo, "eocd.pt", bytes(bad)) in ("bytes", "torch-zip")
    bad = bytearray(data)
    bad[200:260] = os.urandom(60)  # garbage inside the pickle / headers
    _roundtrip(repo, "garbage.pt", bytes(bad))


def test_lying_safetensors_header(repo, tmp_path):
    save_file({"a": torch.ones(10), "b": torch.zeros(10)}, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8: 8 + n])
    header["a"]["data_offsets"] = [0, 10_000_000]  # points past the end of file
    h2 = json.dumps(header).encode()
    lying = struct.pack("<Q", len(h2)) + h2 + data[8 + n:]
    assert split(memoryview(lying))[0] == "bytes"
    assert _roundtrip(repo, "lying.safetensors", lying) == "bytes"
    overlapping = dict(header)
    overlapping["a"] = dict(header["a"], data_offsets=[0, 40])
    overlapping["b"] = dict(header["b"], data_offsets=[20, 60])
    h3 = json.dumps(overlapping).encode()
    assert _roundtrip(repo, "overlap.safetensors", struct.pack("<Q", len(h3)) + h3 + data[8 + n:]) == "bytes"
    assert _roundtrip(repo, "hugelen.safetensors", struct.pack("<Q", 1 << 62) + b"{}") == "bytes"
    assert _roundtrip(repo, "trunc.safetensors", data[: len(data) - 7]) == "bytes"


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/coralfs-pwned-marker",))


def test_malicious_pickle_is_never_executed(repo, tmp_path):
    marker = "/tmp/coralfs-pwned-marker"
    if os.path.exists(marker):
        os.unlink(marker)
    # a torch-zip whose data.pkl would run os.system if unpickled, plus a tensor storage
    src = io.BytesIO()
    torch.save({"w": torch.ones(4)}, src)
    zin = zipfile.ZipFile(io.BytesIO(src.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = pickle.dumps({"w": _Evil()}, protocol=2)
            zout.writestr(info, data)
    evil_pt = out.getvalue()
    _roundtrip(repo, "evil.pt", evil_pt)
    # and a legacy (non-zip) pickle checkpoint
    _roundtrip(repo, "evil_legacy.pt", pickle.dumps(_Evil(), protocol=4))
    assert not os.path.exists(marker), "coralfs executed pickle code while storing"


def test_bad_paths(repo):
    for bad in ["../x", "a/../../x", "/etc/passwd", "a\x00b", "", ".coralfs/store/data.mdb", "a//b"]:
        with pytest.raises((InvalidPath, PathNotFound)):
            repo.save({"w": torch.ones(1)}, bad)
    with pytest.raises(PathNotFound):
        repo.add([os.path.join(repo.root, "..", "outside.pt")])
    with pytest.raises(PathNotFound):
        repo.add([os.path.join(repo.root, "missing.pt")])


def test_empty_and_nonckpt_files(repo):
    assert _roundtrip(repo, "empty.pt", b"") == "bytes"
    assert _roundtrip(repo, "config.json", b'{"hidden_size": 8}') == "bytes"
    assert _roundtrip(repo, "zip.pt", b"PK\x03\x04" + b"\x00" * 100) == "bytes"


def test_map_full_grows_and_continues(tmp_path):
    r = Repository.init(tmp_path / "r")
    r.store.env.set_mapsize(2 << 20)  # force MapFullError on the next big write
    torch.manual_seed(0)
    big = {"w": torch.randn(1024, 1024)}  # 4 MiB of incompressible-ish floats
    save_pt(big, tmp_path / "r" / "big.pt")
    r.add([tmp_path / "r" / "big.pt"])
    r.commit("big")
    assert r.store.env.info()["map_size"] > (2 << 20)
    assert sha256(r.open("HEAD", "big.pt").read()) == sha256(tmp_path / "r" / "big.pt")
    r.close()


def test_streaming_memory_is_bounded(tmp_path):
    """Ingest and read of a 400 MB file: anonymous memory stays far below the file size.

    The file is memory-mapped for ingest; those pages are file-backed and reclaimable, so
    the bound is on anonymous memory (RssAnon), sampled while the work runs."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, threading, time, numpy as np
        from coralfs.repository import Repository
        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
        r = Repository.init({str(tmp_path / 'r')!r}, cache_bytes=32 << 20)
        p = os.path.join(r.root, "big.bin")
        rng = np.random.default_rng(0)
        with open(p, "wb") as f:
            for _ in range(48):
                f.write(rng.integers(0, 4, 8 << 20, dtype=np.uint8).tobytes())
        base = anon(); peak = [base]; stop = False
        def sample():
            while not stop:
                peak[0] = max(peak[0], anon()); time.sleep(0.01)
        th = threading.Thread(target=sample); th.start()
        r.add([p]); r.commit("big")
        f = r.open("HEAD", "big.bin")
        while f.read(8 << 20): pass
        stop = True; th.join()
        print(base, peak[0])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    base, peak = (int(x) for x in out.stdout.split())
    assert peak - base < 160 * 1024, f"anonymous memory grew by {(peak - base) // 1024} MiB for a 384 MiB file"


# ------------------------------------------------------------------ valid but unusual files: stored exactly
def _st_bytes(tensors: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors if tensors is not None else {"a": torch.ones(4), "b": torch.zeros(2, 3)})


def _st_with_header(header: bytes | str, body: bytes = b"") -> bytes:
    h = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(h)) + h + body


def _st_edit(edit) -> bytes:
    """A real safetensors file whose JSON header text went through ``edit``."""
    data = _st_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return _st_with_header(edit(data[8: 8 + n].decode()), data[8 + n:])


def _check_split(data: bytes) -> str:
    fmt, regions = split(memoryview(data))
    pos = 0
    for r in regions:
        assert r.start == pos and r.end > r.start
        pos = r.end
    assert pos == len(data)
    return fmt


UNUSUAL_SAFETENSORS = {
    "shape-1e999": lambda: _st_edit(lambda h: h.replace('"shape":[4]', '"shape":[1e999]')),
    "offset-1e999": lambda: _st_edit(lambda h: h.replace('"data_offsets":[0,16]', '"data_offsets":[0,1e999]')),
    "offset-neg-1e999": lambda: _st_edit(lambda h: h.replace('"data_offsets":[0,16]', '"data_offsets":[-1e999,16]')),
    "shape-nan": lambda: _st_edit(lambda h: h.replace('"shape":[4]', '"shape":[NaN]')),
    "deep-json": lambda: _st_with_header(b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"),
    "deep-json-object": lambda: _st_with_header(b'{"a":' + b'{"b":' * 100_000 + b"1" + b"}" * 100_001),
    "negative-dims": lambda: _st_edit(lambda h: h.replace('"shape":[4]', '"shape":[-1,-4]')),
    "float-dims": lambda: _st_edit(lambda h: h.replace('"shape":[4]', '"shape":[4.0]')),
    "bool-dims": lambda: _st_edit(lambda h: h.replace('"shape":[4]', '"shape":[true,4]')),
    "string-dims": lambda: _st_edit(lambda h: h.replace('"shape":[4]', '"shape":["4"]')),
    "huge-dims": lambda: _st_edit(lambda h: h.replace('"shape":[4]', '"shape":[0,' + "9" * 4000 + "]")
                                  .replace('"data_offsets":[0,16]', '"data_offsets":[0,0]')),
    "huge-int-5000-digits": lambda: _st_edit(lambda h: h.replace('"shape":[4]', '"shape":[' + "9" * 5000 + "]")),
    "dtype-list": lambda: _st_edit(lambda h: h.replace('"dtype":"F32"', '"dtype":["F32"]', 1)),
    "dtype-long": lambda: _st_edit(lambda h: h.replace('"dtype":"F32"', '"dtype":"' + "Q" * 5000 + '"', 1)),
    "dtype-nul": lambda: _st_edit(lambda h: h.replace('"dtype":"F32"', '"dtype":"F\\u000032"', 1)),
    "name-lone-surrogate": lambda: _st_edit(lambda h: h.replace('"a":', '"\\ud800a":', 1)),
    "offsets-three": lambda: _st_edit(lambda h: h.replace('"data_offsets":[0,16]', '"data_offsets":[0,8,16]')),
    "info-not-object": lambda: _st_edit(lambda h: h.replace('"a":{', '"a":[{', 1).replace('16]}', '16]}]', 1)),
    "metadata-odd": lambda: _st_edit(lambda h: h.replace("{", '{"__metadata__":[1,{"x":[2]}],', 1)),
    "many-empty-tensors": lambda: _st_with_header(
        "{" + ",".join(f'"t{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}' for i in range(20_000)) + "}"),
}


@pytest.mark.parametrize("case", sorted(UNUSUAL_SAFETENSORS))
def test_unusual_safetensors_are_stored_exactly(repo, case):
    """Valid-but-unusual and invalid safetensors headers: split never raises, add stores the bytes."""
    data = UNUSUAL_SAFETENSORS[case]()
    _check_split(data)
    assert _roundtrip(repo, f"{case}.safetensors", data) in ("bytes", "safetensors")


def test_long_tensor_names_are_split_and_keep_their_delta_base(repo):
    """A tensor name past LMDB's key limit (the tb\\0 index) is stored as a checkpoint; a second file with
    the same long name deltas forward against it."""
    from coralfs.store.keys import tensor_index_key

    torch.manual_seed(0)
    long = "layer." * 200 + "weight"  # 1206 bytes
    w = torch.randn(256, 256)
    first = _st_bytes({long: w, "b": torch.zeros(3)})
    assert _roundtrip(repo, "first.safetensors", first) == "safetensors"
    second = _st_bytes({long: w + 1e-3 * torch.randn(256, 256), "b": torch.zeros(3)})
    p = os.path.join(repo.root, "second.safetensors")
    with open(p, "wb") as f:
        f.write(second)
    stats = repo.add([p])
    assert stats.delta_chunks >= 1  # found its base through the (hashed) index key
    repo.commit("second")
    assert sha256(repo.open("HEAD", "second.safetensors").read()) == sha256(second)
    man = repo.get_manifest(repo.entry("HEAD", "second.safetensors").manifest)
    assert long in man.tensors()
    # names that fit keep exactly the key every earlier version wrote
    assert tensor_index_key("F32", "fc1.weight", 3) == b"tb\x00F32\x00fc1.weight\x003"
    key = tensor_index_key("F32", long, 0)
    assert len(key) <= 480 and key != tensor_index_key("F32", long, 1)
    assert tensor_index_key("F32", "x" * 2000, 0) != tensor_index_key("F16", "x" * 2000, 0)


def test_long_torch_tensor_names(repo):
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save({"k" * 700: torch.randn(64, 64), "\udcff-not-utf8": torch.ones(3)}, buf)
    assert _roundtrip(repo, "long.pt", buf.getvalue()) == "torch-zip"


def _zip_with_extra(central_extra: bytes) -> bytes:
    """A torch.save zip rewritten with a placeholder extra field on data/0, then patched in the
    central directory to ``central_extra`` (same length)."""
    src = io.BytesIO()
    torch.save({"w": torch.arange(64, dtype=torch.float32)}, src)
    zin = zipfile.ZipFile(io.BytesIO(src.getvalue()))
    out = io.BytesIO()
    placeholder = struct.pack("<HH", 0xCAFE, len(central_extra) - 4) + b"\x00" * (len(central_extra) - 4)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zi = zipfile.ZipInfo(info.filename, info.date_time)
            if info.filename.endswith("data/0"):
                zi.extra = placeholder
            zout.writestr(zi, zin.read(info.filename))
    data = bytearray(out.getvalue())
    assert data.count(placeholder) == 2  # the local header's copy, then the central directory's
    pos = data.rfind(placeholder)
    data[pos: pos + len(central_extra)] = central_extra
    return bytes(data)


@pytest.mark.parametrize("extra", [
    struct.pack("<HH", 1, 0xFFF0) + b"\x00" * 8,  # zip64 extra claiming 65520 bytes
    struct.pack("<HH", 1, 7) + b"\xff" * 7,  # zip64 extra, length not a multiple of 8
    struct.pack("<HH", 1, 8) + b"\xff" * 8,  # zip64 extra with a huge value
])
def test_torch_zip_with_malformed_zip64_extra(repo, extra):
    data = _zip_with_extra(extra)
    _check_split(data)
    assert _roundtrip(repo, "zip64.pt", data) in ("bytes", "torch-zip")


def _torch_zip_with_pickle(pkl: bytes) -> bytes:
    src = io.BytesIO()
    torch.save({"w": torch.ones(16)}, src)
    zin = zipfile.ZipFile(io.BytesIO(src.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, pkl if info.filename.endswith("data.pkl") else zin.read(info.filename))
    return out.getvalue()


def _storage_ref() -> bytes:
    """Pickle opcodes that push torch._utils._rebuild_tensor_v2(storage '0', ...) as torch.save writes it."""
    return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
            + b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x10tQ" + b"K\x00K\x10\x85K\x01\x85\x89}tR")


PICKLE_BOMBS = {
    # a 1M-deep tuple used as a dict key: hashing it recursed in C and crashed the process
    "deep-tuple-key": b"\x80\x02}" + b")" + b"\x85" * 1_000_000 + b"K\x01s.",
    # a frozenset nested in 500k tuples, as a set member
    "deep-frozenset": b"\x80\x04(" + b")" + b"\x85" * 500_000 + b"\x91.",
    # 200k nested dicts around a tensor: naming it built a path string per level (quadratic)
    "deep-dicts": b"\x80\x02}" + (b"X\x01\x00\x00\x00a}") * 200_000 + b"X\x01\x00\x00\x00w" + _storage_ref()
                  + b"s" * 200_001 + b".",
    # 300k distinct globals: one stand-in class each
    "many-globals": b"\x80\x02(" + b"".join(b"cm\nG%d\n" % i for i in range(300_000)) + b"l.",
    # a dict key that is an int of 10,000 digits (str() of it raises ValueError)
    "huge-int-key": b"\x80\x02}" + b"\x8b" + (5000).to_bytes(4, "little") + b"\x01" * 5000
                    + _storage_ref() + b"s.",
    # a memo index of 2**31 - 1: the unpickler sizes its memo array to it (16 GB)
    "memo-index": b"\x80\x02}r\xff\xff\xff\x7f.",
    # a tensor whose size tuple holds an int past 2**64 and a negative one
    "huge-size": b"\x80\x02}X\x01\x00\x00\x00w" + _storage_ref().replace(
        b"K\x10\x85K\x01\x85", b"\x8a\x09" + b"\xff" * 8 + b"\x01J\xff\xff\xff\xff\x86K\x01\x85") + b"s.",
}


@pytest.mark.parametrize("case", sorted(PICKLE_BOMBS))
def test_pickle_bombs_in_torch_zips(tmp_path, case):
    """Hostile data.pkl members: the restricted unpickler neither crashes nor hangs nor blows up memory,
    and the file is stored exactly. Run in a subprocess: the deep tuple used to kill the process (SIGSEGV)."""
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "repo" / f"{case}.pt"
    path.parent.mkdir()
    path.write_bytes(_torch_zip_with_pickle(PICKLE_BOMBS[case]))
    script = textwrap.dedent(f"""
        import hashlib, resource
        resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, 3 << 30))  # heap, not LMDB's map
        from coralfs.repository import Repository
        r = Repository.init({str(tmp_path / 'repo')!r})
        r.add([{str(path)!r}]); r.commit("bomb")
        got = r.open("HEAD", {path.name!r}).read()
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(open({str(path)!r}, "rb").read()).hexdigest()
        print(r.get_manifest(r.entry("HEAD", {path.name!r}).manifest).format)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
        r.close()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, CORALFS_AUTO_REPACK="0"))
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-2000:]}"
    fmt, peak_mib = out.stdout.split()
    assert fmt in ("torch-zip", "bytes")
    assert int(peak_mib) < 1024, f"{peak_mib} MiB of memory for a {path.stat().st_size >> 20} MiB file"


def test_split_never_raises_on_a_parser_bug(monkeypatch):
    """The last line of defence: an unexpected exception inside a parser makes the file plain bytes."""
    from coralfs.formats import safetensors_fmt, torchzip

    def boom(buf):
        raise ZeroDivisionError("a parser bug")

    monkeypatch.setattr(safetensors_fmt, "regions", boom)
    monkeypatch.setattr(torchzip, "regions", boom)
    data = _st_bytes()
    assert split(memoryview(data))[0] == "bytes"
    assert split(memoryview(_pt_bytes()))[0] == "bytes"

    def oom(buf):
        raise MemoryError

    monkeypatch.setattr(safetensors_fmt, "regions", oom)
    with pytest.raises(MemoryError):
        split(memoryview(data))


def test_failed_ingest_reports_its_own_error_not_buffererror(repo, monkeypatch):
    """An error in the middle of an ingest surfaces as itself (the memory map of the file used to be
    closed while views of it were alive: 'BufferError: cannot close exported pointers exist')."""
    from coralfs import ingest

    torch.manual_seed(0)
    save_pt({"w": torch.randn(512, 512)}, os.path.join(repo.root, "m.pt"))
    real = ingest.Ingestor._write

    def fail(t, items, pending):
        raise RuntimeError("the write failed")

    monkeypatch.setattr(ingest.Ingestor, "_write", staticmethod(fail))
    with pytest.raises(RuntimeError, match="the write failed"):
        repo.add([os.path.join(repo.root, "m.pt")])
    monkeypatch.setattr(ingest.Ingestor, "_write", staticmethod(real))
    repo.add([os.path.join(repo.root, "m.pt")])
    repo.commit("m")
    assert sha256(repo.open("HEAD", "m.pt").read()) == sha256(os.path.join(repo.root, "m.pt"))


# ------------------------------------------------------------------ exit codes: not a checkpoint (11) vs corruption (9)
def _evil_pt() -> bytes:
    src = io.BytesIO()
    torch.save({"w": torch.ones(4)}, src)
    zin = zipfile.ZipFile(io.BytesIO(src.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = pickle.dumps({"w": _Evil()}, protocol=2)
            zout.writestr(info, data)
    return out.getvalue()


def test_not_a_checkpoint_exits_11_and_corruption_exits_9(tmp_path, cli, monkeypatch):
    from coralfs.errors import IntegrityError, NotACheckpoint

    monkeypatch.setenv("CORALFS_AUTO_REPACK", "0")
    marker = "/tmp/coralfs-pwned-marker"
    if os.path.exists(marker):
        os.unlink(marker)
    assert (NotACheckpoint.exit_code, IntegrityError.exit_code) == (11, 9)
    root = tmp_path / "r"
    r = Repository.init(root)
    torch.manual_seed(0)
    good = _st_bytes({"w": torch.randn(64, 64)})
    legacy = io.BytesIO()
    torch.save({"w": torch.randn(8)}, legacy, _use_new_zipfile_serialization=False)
    files = {"config.json": b'{"hidden_size": 8}', "notes.txt": b"just text\n", "broken.safetensors": good[:-9],
             "evil.pt": _evil_pt(), "legacy.pt": legacy.getvalue(), "good.safetensors": good}
    for name, data in files.items():
        (root / name).write_bytes(data)
    r.add([root / name for name in files])
    r.commit("files")
    r.close()
    for spec, out, extra, why in [
        ("config.json", "c.safetensors", [], "not a checkpoint"),
        ("notes.txt", "n.pt", ["--format", "pt"], "not a checkpoint"),  # used to be copied as 'n.pt'
        ("broken.safetensors", "b.pt", [], "not a valid safetensors file"),
        ("evil.pt", "e.safetensors", [], "weights-only"),  # used to exit 9
    ]:
        rc, _, err = cli("export", spec, out, *extra, cwd=root)
        assert rc == 11 and why in err and spec in err and "Traceback" not in err, (spec, rc, err)
        assert not (root / out).exists()
    assert not os.path.exists(marker)  # evil.pt's pickle was refused, never run
    # a legacy (non-zip) torch.save file is a checkpoint (stored as bytes): it exports
    rc, _, err = cli("export", "legacy.pt", "l.safetensors", cwd=root)
    assert rc == 0, err
    rc, _, err = cli("export", "legacy.pt", "l.pt", cwd=root)
    assert rc == 0 and sha256(root / "l.pt") == sha256(legacy.getvalue()), err
    assert cli("export", "good.safetensors", "g.pt", cwd=root)[0] == 0
    # corruption keeps exit 9: flip a byte of the tensor's stored record
    r = Repository(root)
    man = r.get_manifest(r.entry("HEAD", "good.safetensors").manifest)
    cid = next(s for s in man.segments if s.kind == "tensor").pieces[0].chunk
    with r.store.read() as t:
        rec = bytearray(t.get("chunks", cid))
    rec[-1] ^= 0xFF
    r.store.write(lambda t: t.put("chunks", cid, bytes(rec)))
    r.close()
    rc, _, err = cli("export", "good.safetensors", "g2.pt", cwd=root)
    assert rc == 9 and ("corrupt" in err or "does not match" in err), (rc, err)


def test_failed_ingest_leaves_no_views_of_the_callers_map(repo, monkeypatch, tmp_path):
    """A caller that maps the file itself can close its map while the ingest's error propagates
    (the traceback's frames used to keep slices of it alive)."""
    import mmap

    from coralfs import ingest

    torch.manual_seed(0)
    p = save_pt({"w": torch.randn(512, 512)}, tmp_path / "m.pt")

    def fail(t, items, pending):
        raise RuntimeError("the write failed")

    monkeypatch.setattr(ingest.Ingestor, "_write", staticmethod(fail))
    with open(p, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mm)
        with pytest.raises(RuntimeError, match="the write failed"):
            try:
                repo.ingest_buffer(view, "m.pt")
            finally:
                view.release()
                mm.close()  # BufferError here would replace the error
