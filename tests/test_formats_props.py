"""Property tests of ``formats.split`` and ingest on mutated real checkpoints.

Real safetensors files and ``torch.save`` zips (small trained models) go through random
mutations: bit flips, truncation, splices from another checkpoint, deleted and inserted
runs, edits of the numbers in a safetensors header (huge, negative, fractional, 1e999),
edits of its JSON (types changed, keys dropped, nesting added), edge values written over
the integer fields that follow zip signatures, and pickle opcodes written into a torch
zip's ``data.pkl``. For every result:

- ``split`` returns regions that cover the file exactly (in order, gap-free, lengths summing
  to the file size) and never raises;
- ``Repository.add`` + ``commit`` stores it, and reading it back gives the same bytes (hash).

Example counts are small for ``make test`` (a few seconds); ``HYPOTHESIS_PROFILE=deep``
runs many more.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from safetensors.torch import save as st_save  # noqa: E402

from coralfs.formats import split  # noqa: E402
from coralfs.repository import Repository  # noqa: E402
from tests.depth import DEEP as _DEEP  # noqa: E402
from tests.factories import TinyNet, train_steps, varied_state_dict  # noqa: E402

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               derandomize=not _DEEP)
SPLIT = settings(max_examples=3000 if _DEEP else 400, **_COMMON)
ROUNDTRIP = settings(max_examples=300 if _DEEP else 25, **_COMMON)


# ------------------------------------------------------------------ seeds: real checkpoints
def _pt(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@functools.cache
def seeds() -> tuple[bytes, ...]:
    torch.manual_seed(0)
    model = TinyNet(d=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(model, opt, 2)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    return (
        _pt(sd),
        _pt({"model": sd, "optimizer": opt.state_dict(), "step": 2}),
        _pt(varied_state_dict()),
        st_save({k: v.contiguous() for k, v in sd.items()}),
        st_save({"a": torch.arange(6, dtype=torch.int16), "b": torch.ones(2, 3, dtype=torch.bfloat16)},
                metadata={"format": "pt", "note": "x"}),
    )


def _is_safetensors(data: bytes) -> bool:
    return data[:4] != b"PK\x03\x04"


# ------------------------------------------------------------------ mutations
EDGE_NUMBERS = ["0", "-1", "1", "1e999", "-1e999", "1.5", "NaN", "Infinity", str(2**63), str(2**64 + 7),
                "9" * 40, "-0", "true", "null", '"7"', "[]", "{}"]
EDGE_INTS = [0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1]
_NUMBER = re.compile(rb"-?\d+(\.\d+)?([eE][-+]?\d+)?")


def _header(data: bytes) -> tuple[int, bytes] | None:
    if len(data) < 8:
        return None
    n = struct.unpack("<Q", data[:8])[0]
    if 8 + n > len(data):
        return None
    return n, data[8 : 8 + n]


def _with_header(data: bytes, old_n: int, head: bytes) -> bytes:
    return struct.pack("<Q", len(head)) + head + data[8 + old_n :]


@st.composite
def mutation(draw: st.DrawFn, data: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "delete", "insert", "number", "json", "field",
                                 "pickle"]))
    size = len(data)
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            p = draw(st.integers(0, max(0, size - 1)))
            if size:
                b = bytearray(data)
                b[p] ^= 1 << draw(st.integers(0, 7))
                data = bytes(b)
        return data
    if kind == "truncate":
        return data[: draw(st.integers(0, size))]
    if kind == "splice":
        other = draw(st.sampled_from(seeds()))
        a = draw(st.integers(0, len(other)))
        b = draw(st.integers(a, min(len(other), a + 4096)))
        p = draw(st.integers(0, size))
        replace = draw(st.booleans())
        return data[:p] + other[a:b] + data[p + (b - a if replace else 0):]
    if kind == "delete":
        a = draw(st.integers(0, size))
        return data[:a] + data[a + draw(st.integers(1, 512)):]
    if kind == "insert":
        p = draw(st.integers(0, size))
        return data[:p] + draw(st.binary(min_size=1, max_size=64)) + data[p:]
    if kind == "number":
        h = _header(data)
        if h is None:
            return data
        n, head = h
        nums = list(_NUMBER.finditer(head))
        if not nums:
            return data
        m = nums[draw(st.integers(0, len(nums) - 1))]
        value = draw(st.sampled_from(EDGE_NUMBERS)).encode()
        return _with_header(data, n, head[: m.start()] + value + head[m.end():])
    if kind == "json":
        h = _header(data)
        if h is None:
            return data
        n, head = h
        try:
            obj = json.loads(head)
        except ValueError:
            return data
        if not isinstance(obj, dict) or not obj:
            return data
        name = draw(st.sampled_from(sorted(obj)))
        edit = draw(st.sampled_from(["drop", "retype", "nest", "dup-offsets", "drop-field", "rename"]))
        if edit == "drop":
            del obj[name]
        elif edit == "retype":
            obj[name] = draw(st.sampled_from([None, 1, "x", [1, 2], {"dtype": []}]))
        elif edit == "nest":
            obj[name] = {"x": obj[name]} if draw(st.booleans()) else [obj[name]]
        elif edit == "dup-offsets" and isinstance(obj[name], dict):
            other = obj[draw(st.sampled_from(sorted(obj)))]
            if isinstance(other, dict) and "data_offsets" in other:
                obj[name]["data_offsets"] = other["data_offsets"]
        elif edit == "drop-field" and isinstance(obj[name], dict) and obj[name]:
            obj[name].pop(draw(st.sampled_from(sorted(obj[name]))))
        elif edit == "rename":
            obj[draw(st.sampled_from(["\ud800", "", "x" * 700, "__metadata__"]))] = obj.pop(name)
        head = json.dumps(obj, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
        return _with_header(data, n, head)
    if kind == "pickle":
        # opcodes written into a torch zip's data.pkl (it follows its local header, padded to 64 bytes)
        at = data.find(b"data.pkl")
        if at < 0:
            return data
        b = bytearray(data)
        for _ in range(draw(st.integers(1, 6))):
            p = min(len(b) - 1, at + draw(st.integers(8, 400)))
            b[p : p + 1] = draw(st.sampled_from([b"(", b"t", b"R", b")", b"\x85", b"\x86", b"\x91", b"}", b"]", b"s",
                                                 b"u", b"e", b"b", b"\x93", b"\x94", b"h\x00", b"0", b"1", b"2",
                                                 b"Q", b"\x8a\xff", b"X\xff\xff\xff\x7f", b"."]))
        return bytes(b)
    # "field": an edge value over an integer field right after a zip signature (sizes, offsets, counts)
    sigs = [m.start() for m in re.finditer(rb"PK(\x01\x02|\x03\x04|\x05\x06|\x06\x06|\x06\x07)", data)]
    if not sigs:
        return data
    p = draw(st.sampled_from(sigs)) + 4 + draw(st.integers(0, 40))
    width = draw(st.sampled_from([2, 4, 8]))
    value = draw(st.sampled_from(EDGE_INTS)) & ((1 << (8 * width)) - 1)
    return data[:p] + value.to_bytes(width, "little") + data[p + width:]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = draw(st.sampled_from(seeds()))
    for _ in range(draw(st.integers(1, 3))):
        data = draw(mutation(data))
    return data


# ------------------------------------------------------------------ properties
def check_regions(data: bytes) -> str:
    fmt, regions = split(memoryview(data))
    assert fmt in ("bytes", "safetensors", "torch-zip")
    pos = 0
    for r in regions:
        assert r.kind in ("bytes", "tensor")
        assert r.start == pos and r.end > r.start, (r, pos)
        if r.kind == "tensor":
            assert r.width >= 1 and (r.end - r.start) % r.width == 0
            r.name.encode("utf-8")
        pos = r.end
    assert pos == len(data) and sum(r.end - r.start for r in regions) == len(data)
    return fmt


def test_seeds_parse_as_checkpoints():
    fmts = [check_regions(s) for s in seeds()]
    assert fmts == ["torch-zip", "torch-zip", "torch-zip", "safetensors", "safetensors"]


@SPLIT
@given(mutated())
def test_split_covers_mutated_checkpoints_exactly(data):
    check_regions(data)


@pytest.fixture(scope="module")
def shared_repo(tmp_path_factory):
    r = Repository.init(tmp_path_factory.mktemp("props") / "repo", auto_repack=False)
    yield r
    r.close()


_counter = iter(range(10**9))


@ROUNDTRIP
@given(st.lists(mutated(), min_size=1, max_size=3))
def test_mutated_checkpoints_roundtrip_through_add_and_commit(shared_repo, files):
    """Mutated files (a few at once, so deltas and dedup between them are exercised) are stored
    and read back bit-exactly through the work tree, the stage and a commit."""
    r = shared_repo
    names = []
    for data in files:
        name = f"f{next(_counter)}.{'safetensors' if _is_safetensors(data) else 'pt'}"
        with open(os.path.join(r.root, name), "wb") as f:
            f.write(data)
        names.append(name)
    r.add([os.path.join(r.root, n) for n in names])
    r.commit(f"{len(names)} mutated files")
    for name, data in zip(names, files, strict=True):
        with r.open("HEAD", name) as f:
            assert hashlib.sha256(f.read()).hexdigest() == hashlib.sha256(data).hexdigest()
        os.unlink(os.path.join(r.root, name))
