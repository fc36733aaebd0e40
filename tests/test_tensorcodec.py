"""Tensor codec: bit-exact round trips for every codec, shape changes, odd widths, real-ish data."""

from __future__ import annotations

import threading
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coralfs.codec import tensor as tc
from coralfs.errors import FormatError
from tests.depth import pick

ALL_CODECS = (tc.RAW, tc.ZSTD, tc.PLANES, tc.XOR, tc.SUB, tc.LIN2)
WIDTHS = (1, 2, 3, 4, 8, 0, 16)  # 3, 0, 16 are treated as 1

# Bit patterns that must survive untouched: NaNs with payloads, infinities, signed zeros,
# denormals, extremes.
F32_SPECIAL = [
    0x00000000,
    0x80000000,
    0x7F800000,
    0xFF800000,
    0x7FC00000,
    0xFFC00001,
    0x7F800001,
    0x00000001,
    0x807FFFFF,
    0x00400000,
    0x7F7FFFFF,
    0xFF7FFFFF,
    0x3F800000,
    0xBF800000,
]
F16_SPECIAL = [0x0000, 0x8000, 0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7C01, 0x0001, 0x83FF, 0x7BFF, 0x3C00]
BF16_SPECIAL = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x0001, 0x807F, 0x7F7F, 0x3F80]
F64_SPECIAL = [0, 1 << 63, 0x7FF0 << 48, 0xFFF0 << 48, 0x7FF8 << 48, (0x7FF0 << 48) | 1, 1, (1 << 52) - 1]


def roundtrip(codec: int, payload: bytes, raw: bytes, width: int, base=None, base2=None) -> None:
    if codec == tc.RAW:
        payload = raw
    out = tc.decode(codec, payload, len(raw), width, base, base2)
    assert type(out) is bytes
    assert out == raw


def encode_roundtrip(raw: bytes, width: int, base=None, base2=None, level: int = 3) -> tuple[int, bytes]:
    codec, payload = tc.encode(raw, width, base, base2, level=level)
    assert codec in ALL_CODECS
    if codec == tc.RAW:
        assert payload == b""
    else:
        assert len(payload) < len(raw)
    if tc.uses_bases(codec) >= 1:
        assert base is not None
    if tc.uses_bases(codec) == 2:
        assert base2 is not None
    roundtrip(codec, payload, raw, width, base, base2)
    return codec, payload


# --------------------------------------------------------------------------- strategies


@st.composite
def float_patterns(draw):
    """Bytes of a float tensor mixing special bit patterns, small floats and random bits."""
    width, specials = draw(
        st.sampled_from([(4, F32_SPECIAL), (2, F16_SPECIAL), (2, BF16_SPECIAL), (8, F64_SPECIAL)])
    )
    n = draw(st.integers(0, 300))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    dt = {2: np.uint16, 4: np.uint32, 8: np.uint64}[width]
    if width == 4:
        vals = (rng.standard_normal(n) * 0.02).astype(np.float32).view(dt)
    elif width == 8:
        vals = rng.standard_normal(n).view(dt)
    else:
        vals = (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(dt)
    mask = rng.random(n) < draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    vals[mask] = rng.choice(np.array(specials, dtype=dt), size=int(mask.sum()))
    tail = draw(st.binary(max_size=width - 1))
    return width, vals.tobytes() + tail


def perturb(rng: np.random.Generator, raw: bytes, width: int, kind: str) -> bytes:
    """A base related to ``raw``: some elements changed, then cut or extended."""
    a = bytearray(raw)
    if a:
        for i in rng.integers(0, len(a), size=max(1, len(a) // 10)):
            a[i] ^= 1 << int(rng.integers(0, 8))
    if kind == "shorter":
        a = a[: int(rng.integers(0, len(a) + 1))]
    elif kind == "longer":
        a += rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
    elif kind == "unaligned":
        a = a[: max(0, len(a) - 1 - width // 2)]
    return bytes(a)


base_kinds = st.sampled_from(["equal", "shorter", "longer", "unaligned", "empty", "other"])


def make_base(rng, raw: bytes, width: int, kind: str) -> bytes:
    if kind == "empty":
        return b""
    if kind == "other":
        return rng.integers(0, 256, len(raw), dtype=np.uint8).tobytes()
    return perturb(rng, raw, width, kind)


# --------------------------------------------------------------------------- properties


@settings(max_examples=pick(150, 1500), deadline=None)
@given(
    raw=st.binary(max_size=600),
    width=st.sampled_from(WIDTHS),
    codec=st.sampled_from(ALL_CODECS),
    flags=st.sampled_from([0, tc.ROT]),
    k1=base_kinds,
    k2=base_kinds,
    seed=st.integers(0, 2**32 - 1),
)
def test_forced_codec_roundtrip_bytes(raw, width, codec, flags, k1, k2, seed):
    rng = np.random.default_rng(seed)
    base = make_base(rng, raw, width, k1)
    base2 = make_base(rng, base, width, k2)
    payload = tc._encode_with(codec, raw, width, base, base2, flags=flags if codec >= tc.PLANES else 0)
    roundtrip(codec, payload, raw, width, base, base2)


@settings(max_examples=pick(120, 1200), deadline=None)
@given(
    fp=float_patterns(),
    codec=st.sampled_from(ALL_CODECS),
    flags=st.sampled_from([0, tc.ROT]),
    k1=base_kinds,
    k2=base_kinds,
    seed=st.integers(0, 2**32 - 1),
)
def test_forced_codec_roundtrip_float_patterns(fp, codec, flags, k1, k2, seed):
    width, raw = fp
    rng = np.random.default_rng(seed)
    base = make_base(rng, raw, width, k1)
    base2 = make_base(rng, base, width, k2)
    payload = tc._encode_with(codec, raw, width, base, base2, flags=flags if codec >= tc.PLANES else 0)
    roundtrip(codec, payload, raw, width, base, base2)


@settings(max_examples=pick(120, 1200), deadline=None)
@given(
    fp=float_patterns(),
    k1=base_kinds,
    k2=base_kinds,
    nbases=st.integers(0, 2),
    seed=st.integers(0, 2**32 - 1),
)
def test_encode_roundtrip(fp, k1, k2, nbases, seed):
    width, raw = fp
    rng = np.random.default_rng(seed)
    base = make_base(rng, raw, width, k1) if nbases >= 1 else None
    base2 = make_base(rng, base, width, k2) if nbases == 2 else None
    encode_roundtrip(raw, width, base, base2)


@settings(max_examples=pick(40, 400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fp=float_patterns(), k1=base_kinds, seed=st.integers(0, 2**32 - 1))
def test_encode_roundtrip_sampled_path(fp, k1, seed):
    """Force the sample-then-compress path on small inputs (sample smaller than the chunk)."""
    width, raw = fp
    rng = np.random.default_rng(seed)
    base = make_base(rng, raw, width, k1)
    base2 = make_base(rng, base, width, "equal")
    with mock.patch.object(tc, "SAMPLE_BYTES", 64):
        encode_roundtrip(raw, width, base, base2)
        encode_roundtrip(raw, width)


# --------------------------------------------------------------------------- examples


def test_empty():
    assert tc.encode(b"", 4) == (tc.RAW, b"")
    assert tc.encode(b"", 4, b"abcd", b"efgh") == (tc.RAW, b"")
    for codec in ALL_CODECS:
        payload = tc._encode_with(codec, b"", 4, b"", b"")
        roundtrip(codec, payload, b"", 4, b"", b"")


def test_uses_bases():
    assert [tc.uses_bases(c) for c in ALL_CODECS] == [0, 0, 0, 1, 1, 2]
    with pytest.raises(FormatError):
        tc.uses_bases(99)


def test_random_bytes_stored_raw():
    raw = np.random.default_rng(1).integers(0, 256, 1 << 18, dtype=np.uint8).tobytes()
    assert tc.encode(raw, 4) == (tc.RAW, b"")


def test_text_like_bytes_never_lose_to_plain_zstd():
    raw = b"".join(b"line %d of some log output, nothing like a tensor\n" % i for i in range(5000))
    for width in (1, 4):
        codec, payload = encode_roundtrip(raw, width)
        assert codec in (tc.ZSTD, tc.PLANES)
        assert len(payload) <= 1.05 * len(tc._encode_with(tc.ZSTD, raw, width))


def test_identical_version_is_tiny():
    raw = (np.random.default_rng(2).standard_normal(1 << 17) * 0.02).astype(np.float32).tobytes()
    codec, payload = encode_roundtrip(raw, 4, base=raw)
    assert tc.uses_bases(codec) == 1
    assert len(payload) < len(raw) / 100


def test_large_chunk_shape_change_and_inputs():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal(300_000) * 0.02).astype(np.float32)
    new = w + (rng.standard_normal(w.size) * 1e-4).astype(np.float32)
    raw = new.tobytes() + b"\x01\x02"  # odd tail
    for base in (w.tobytes(), w[:200_000].tobytes(), np.concatenate([w, w[:5000]]).tobytes()):
        codec, payload = encode_roundtrip(raw, 4, base)
        assert codec in (tc.XOR, tc.SUB)
        # any buffer type works for inputs and payloads
        out = tc.decode(codec, memoryview(bytearray(payload)), len(raw), 4, memoryview(base), None)
        assert out == raw
    codec, payload = tc.encode(memoryview(raw), 4, bytearray(w.tobytes()))
    roundtrip(codec, payload, raw, 4, w.tobytes())
    codec, payload = tc.encode(new, 4)  # numpy array input
    roundtrip(codec, payload, new.tobytes(), 4)


def test_level_is_honoured():
    raw = (np.random.default_rng(4).standard_normal(20_000) * 0.02).astype(np.float32).tobytes()
    for level in (1, 3, 9, 19):
        encode_roundtrip(raw, 4, level=level)
        payload = tc._encode_with(tc.PLANES, raw, 4, level=level)
        roundtrip(tc.PLANES, payload, raw, 4)


def test_threads():
    rng = np.random.default_rng(5)
    chunks = [(rng.standard_normal(50_000) * 0.02).astype(np.float32).tobytes() for _ in range(8)]
    errors = []

    def work(i):
        try:
            for _ in range(3):
                base = chunks[(i + 1) % len(chunks)]
                encode_roundtrip(chunks[i], 4, base)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(chunks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_corrupt_payloads_raise():
    rng = np.random.default_rng(6)
    raw = (rng.standard_normal(10_000) * 0.02).astype(np.float32).tobytes()
    base = raw[:-400]
    payload = tc._encode_with(tc.SUB, raw, 4, base)
    roundtrip(tc.SUB, payload, raw, 4, base)
    bad_format = bytes([99]) + payload[1:]
    bad_flags = payload[:1] + bytes([0x80]) + payload[2:]
    for bad in (bad_format, bad_flags, payload[:-1], payload + b"x", payload[:3], b""):
        with pytest.raises(FormatError):
            tc.decode(tc.SUB, bad, len(raw), 4, base)
    with pytest.raises(FormatError):  # base too short for the recorded delta length
        tc.decode(tc.SUB, payload, len(raw), 4, base[:100])
    with pytest.raises(ValueError):
        tc.decode(tc.SUB, payload, len(raw), 4)
    with pytest.raises(FormatError):
        tc.decode(tc.ZSTD, b"not zstd", 10, 4)
    with pytest.raises(FormatError):
        tc.decode(tc.RAW, b"abc", 4, 4)
    with pytest.raises(FormatError):
        tc.decode(42, payload, len(raw), 4)


def test_format_1_golden_payloads():
    """Payloads written by format 1 must stay decodable (tiny input: planes stored raw, no zstd)."""
    raw = np.array([1.0, -0.0, np.nan, 3.5, -2.25, 1e-40], np.float32).tobytes() + b"\x07"
    base = np.array([1.0, 0.0, np.inf, 3.25, -2.0], np.float32).tobytes()  # shorter: 5 elements
    base2 = np.array([0.5, 0.0, 1.0, 3.0], np.float32).tobytes()  # 4 elements
    golden = {
        tc.PLANES: "0101000600060006000600010000018400000000002d000080c020027f00ff80800007",
        tc.XOR: "01000500060006000600060000000000c200000000001600004030100100800000000007",
        tc.SUB: "010005000600060006000600ff000000c200ff0000001600ff8020200100ff0000000007",
        tc.LIN2: "010005040006000600060006ffffff0000c2ffffff000016ffff7f00200100ff7f00000007",
    }
    for codec, hexpayload in golden.items():
        assert tc.decode(codec, bytes.fromhex(hexpayload), len(raw), 4, base, base2) == raw
        flags = tc.ROT if codec == tc.PLANES else 0
        assert tc._encode_with(codec, raw, 4, base, base2, flags=flags).hex() == hexpayload


# --------------------------------------------------------------------------- real-ish data


def _bf16(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even


def _train(steps: int, every: int, lr: float, seed: int = 0):
    """A small MLP regression trained with AdamW in numpy; snapshots of (W1, exp_avg_sq of W1)."""
    rng = np.random.default_rng(seed)
    d_in, d_h = 64, 512
    x = rng.standard_normal((256, d_in)).astype(np.float32)
    teacher = rng.standard_normal((d_in, 1)).astype(np.float32)
    y = np.tanh(x @ teacher)
    w1 = (rng.standard_normal((d_in, d_h)) / np.sqrt(d_in)).astype(np.float32)
    w2 = (rng.standard_normal((d_h, 1)) / np.sqrt(d_h)).astype(np.float32)
    params = [w1, w2]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    snaps = []
    for t in range(1, steps + 1):
        idx = rng.integers(0, len(x), 64)
        xb, yb = x[idx], y[idx]
        h = np.maximum(xb @ w1, 0)
        err = (h @ w2 - yb) / len(xb)
        g2 = h.T @ err
        g1 = xb.T @ ((err @ w2.T) * (h > 0))
        for p, g, mi, vi in zip(params, (g1, g2), m, v, strict=True):
            mi *= 0.9
            mi += 0.1 * g
            vi *= 0.999
            vi += 0.001 * g * g
            p *= np.float32(1 - lr * 0.01)
            p -= (lr * (mi / (1 - 0.9**t)) / (np.sqrt(vi / (1 - 0.999**t)) + 1e-8)).astype(np.float32)
        if t % every == 0:
            snaps.append((w1.copy(), v[0].copy()))
    return snaps


@pytest.fixture(scope="module")
def finetune_series():
    return _train(steps=60, every=10, lr=2e-5)


def test_real_finetune_deltas_beat_plain_zstd(finetune_series):
    (w_a, _), (w_b, _), (w_c, _) = finetune_series[-3:]
    raw, base, base2 = w_c.tobytes(), w_b.tobytes(), w_a.tobytes()
    zstd_size = len(tc._encode_with(tc.ZSTD, raw, 4))
    planes = len(tc._encode_with(tc.PLANES, raw, 4))
    xor = len(tc._encode_with(tc.XOR, raw, 4, base))
    sub = len(tc._encode_with(tc.SUB, raw, 4, base))
    lin2 = len(tc._encode_with(tc.LIN2, raw, 4, base, base2))
    assert planes < zstd_size
    assert xor < 0.8 * zstd_size
    assert sub < xor
    assert lin2 < zstd_size
    codec, payload = encode_roundtrip(raw, 4, base, base2)
    assert tc.uses_bases(codec) >= 1
    assert len(payload) <= 1.02 * min(xor, sub, lin2)
    # bf16 copies: deltas shrink even more
    r16, b16 = _bf16(w_c).tobytes(), _bf16(w_b).tobytes()
    codec, payload = encode_roundtrip(r16, 2, b16)
    assert len(payload) < 0.6 * len(tc._encode_with(tc.ZSTD, r16, 2))


def test_real_optimizer_moments(finetune_series):
    (_, v_b), (_, v_c) = finetune_series[-2:]
    raw = v_c.tobytes()
    zstd_size = len(tc._encode_with(tc.ZSTD, raw, 4))
    codec, payload = encode_roundtrip(raw, 4, v_b.tobytes())
    assert len(payload) < zstd_size
    assert len(tc._encode_with(tc.PLANES, raw, 4)) < zstd_size
