"""The content hash behind identical-retry detection (``lifl.content_hash``, ``rounds.Digest``):
equal to an independent pure-Python Horner evaluation over the zero-padded words, whatever the
chunking, in both the C kernel and the numpy fallback; one changed byte changes it."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lifl import content_hash
from lifl.content_hash import ContentHash
from lifl.rounds import Digest

P, M = 0x9E3779B97F4A7C15, 1 << 64


def reference(data: bytes) -> int:
    padded = data + b"\0" * (-len(data) % 8)
    h = 0
    for i in range(0, len(padded), 8):
        h = (h * P + int.from_bytes(padded[i:i + 8], "little")) % M
    return h


def chunked(data: bytes, cuts: list[int], copy: bool) -> tuple[int, bytes]:
    hs, dst = ContentHash(), np.zeros(len(data), np.uint8)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for a, b in zip(bounds, bounds[1:]):
        hs.take(data[a:b], dst if copy else None, a)
    return hs.value(), dst.tobytes()


@pytest.fixture(params=["kernel", "numpy"])
def path(request, monkeypatch):   # the same for every example: it only picks the implementation
    if request.param == "numpy":
        monkeypatch.setattr(content_hash, "_foldc", None)
    elif content_hash._foldc is None:
        pytest.skip("the C kernel is not built")
    return request.param


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=3000), cuts=st.lists(st.integers(0, 4000), max_size=8), copy=st.booleans())
def test_any_chunking_equals_the_reference(path, data, cuts, copy):
    h, copied = chunked(data, cuts, copy)
    assert h == reference(data)
    if copy:
        assert copied == data


def test_large_chunks_across_the_kernels_blocks(path):
    data = np.random.default_rng(1).integers(0, 256, 3 * 16384 + 13, np.uint8).tobytes()
    for cuts in ([], [5], [16384 + 3, 40000], list(range(7, len(data), 9999))):
        assert chunked(data, cuts, True)[0] == reference(data)


@given(data=st.binary(min_size=1, max_size=600), at=st.integers(0, 599), flip=st.integers(1, 255))
@settings(max_examples=150, deadline=None)
def test_one_changed_byte_changes_the_hash(data, at, flip):
    at %= len(data)
    other = data[:at] + bytes([data[at] ^ flip]) + data[at + 1:]
    assert chunked(data, [], False)[0] != chunked(other, [], False)[0]


def test_digests_compare_content_size_weight_and_encoding():
    def d(data, w=1.0, enc=1):
        x = Digest(w, enc)
        x.update(data)
        return x
    a = d(b"0123456789")
    assert a == d(b"0123456789") and a.size == 10
    assert a != d(b"0123456780") and a != d(b"0123456789\0") and a != d(b"0123456789", w=2.0)
    assert a != d(b"0123456789", enc=2)
    legacy = Digest.from_dict({"weight": 1.0, "encoding": 1, "size": 10, "crc": 12345})   # a CRC-32 journal record
    assert legacy != a and legacy != legacy
    assert Digest.from_dict({"weight": 1.0, "encoding": 1, "size": 10, "hash": a.hash}) == a
