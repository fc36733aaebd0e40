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
