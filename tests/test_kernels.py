"""The compiled codec loops (coralfs.codec.kernels) give exactly the bytes of the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from coralfs.codec import kernels
from coralfs.codec import tensor as tensorcodec

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="numba is not installed (numpy fallback only)")


def _series(rng: np.random.Generator, w: int, n: int, tail: int) -> list[bytes]:
    """Three versions of a chunk of w-byte elements: smooth float-like drift plus edge values."""
    dt = {2: np.float16, 4: np.float32, 8: np.float64}[w]
    base = rng.standard_normal(n).astype(dt)
    out = []
    for step in range(3):
        v = (base + dt(0.01 * step) * rng.standard_normal(n).astype(dt)).astype(dt)
        u = v.view(f"<u{w}")
        u[:: max(1, n // 7)] = np.iinfo(f"<u{w}").max  # all-ones patterns (NaN payloads)
        u[1 :: max(1, n // 5)] = 0
        out.append(v.tobytes() + rng.integers(0, 256, tail, dtype=np.uint8).tobytes())
    return out


def _decode_both(monkeypatch: pytest.MonkeyPatch, codec: int, payload: bytes, raw_len: int, w: int,
                 b1: bytes | None, b2: bytes | None) -> tuple[bytes, bytes]:
    fast = tensorcodec.decode(codec, payload, raw_len, w, b1, b2)
    with monkeypatch.context() as m:
        m.setattr(kernels, "get", lambda: None)
        slow = tensorcodec.decode(codec, payload, raw_len, w, b1, b2)
    return fast, slow


@pytest.mark.parametrize("w", [2, 4, 8])
@pytest.mark.parametrize("codec", [tensorcodec.PLANES, tensorcodec.XOR, tensorcodec.SUB, tensorcodec.LIN2])
@pytest.mark.parametrize("shape", ["same", "short_bases", "long_bases"])
def test_decode_matches_numpy_reference(monkeypatch: pytest.MonkeyPatch, w: int, codec: int, shape: str) -> None:
    rng = np.random.default_rng(w * 100 + codec)
    n = 5000
    v0, v1, v2 = _series(rng, w, n, tail=w - 1)
    if shape == "short_bases":  # delta covers a prefix; the rest is stored as plain elements
        v0, v1 = v0[: 1234 * w], v1[: 3001 * w]
    elif shape == "long_bases":
        v0, v1 = v0 + v0[:100], v1 + v1[:50]
    for flags in (0, tensorcodec.ROT):
        ch = tensorcodec._Chunk(v2, w, v1 if codec != tensorcodec.PLANES else None,
                                v0 if codec == tensorcodec.LIN2 else None)
        payload = tensorcodec.CODECS[codec].encode(ch, 3, flags)
        with monkeypatch.context() as m:  # the compiled plane split writes the same payload
            m.setattr(kernels, "get", lambda: None)
            assert tensorcodec.CODECS[codec].encode(ch, 3, flags) == payload
        b1 = v1 if codec != tensorcodec.PLANES else None
        b2 = v0 if codec == tensorcodec.LIN2 else None
        fast, slow = _decode_both(monkeypatch, codec, payload, len(v2), w, b1, b2)
        assert fast == slow == v2


def test_decode_handles_writable_and_readonly_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    v0, v1, v2 = _series(rng, 4, 3000, tail=0)
    ch = tensorcodec._Chunk(v2, 4, v1, None)
    payload = tensorcodec.CODECS[tensorcodec.SUB].encode(ch, 3, tensorcodec.ROT)
    for base in (v1, bytearray(v1), memoryview(v1), np.frombuffer(bytearray(v1), np.uint8)):
        out = tensorcodec.decode(tensorcodec.SUB, bytearray(payload), len(v2), 4, base)
        assert out == v2


def test_encode_decode_round_trip_every_codec_choice() -> None:
    rng = np.random.default_rng(11)
    for w in (1, 2, 4, 8):
        if w == 1:
            versions = [rng.integers(0, 256, 4099, dtype=np.uint8).tobytes() for _ in range(3)]
        else:
            versions = _series(rng, w, 4099, tail=3)
        codec, payload = tensorcodec.encode(versions[2], w, versions[1], versions[0])
        if codec == tensorcodec.RAW:  # "store raw": the record holds the bytes themselves
            payload = versions[2]
        bases = [versions[1], versions[0]][: tensorcodec.uses_bases(codec)]
        assert tensorcodec.decode(codec, payload, len(versions[2]), w, *bases) == versions[2]
