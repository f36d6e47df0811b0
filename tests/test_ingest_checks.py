"""The gateway's one pass over each received chunk (``content_hash.ingest`` with
``EncodedLayout.element_checks``): copy, content hash and element checks together. Whatever the
chunking, an element that is NaN/Inf (float values, raw or 16-bit encoded, with ``nonfinite``)
or an int8 block scale that is not a finite float32 within ``MAX_SCALE`` is reported in the chunk
where it ends, for the first such tensor in stream order, with the number of such elements of
that tensor ending in that chunk — checked against a numpy decode of every element, independent
of the kernel's region walk. The copy and the hash are the plain ones. Every test runs with the
kernel's AVX-512 loop (where the CPU has it) and with its portable one."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from lifl import content_hash
from lifl.content_hash import ContentHash
from lifl.encoding import K_Q8, MAX_SCALE, Encoding, encode_pieces, encoded
from lifl.layout import Layout, kernel_id

pytestmark = pytest.mark.skipif(not content_hash.checks_while_copying(), reason="the C kernel is not built")


@pytest.fixture(autouse=True, params=["simd", "portable"])
def kernel_loop(request):
    """The same for every example: it only picks the kernel's implementation."""
    from lifl import _foldc
    if not _foldc.use_simd(request.param == "simd") and request.param == "simd":
        _foldc.use_simd(True)
        pytest.skip("this CPU has no AVX-512")
    yield request.param
    _foldc.use_simd(True)

DTYPES = ["float32", "float64", "float16", "bfloat16", "int32", "int64"]


def arrays_of(specs, seed):
    import ml_dtypes
    rng = np.random.default_rng(seed)
    out = {}
    for i, (dtype, n) in enumerate(specs):
        x = rng.standard_normal(n) * 3
        out[f"t{i}"] = (x.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else
                        x.astype(np.int64).astype(dtype) if dtype.startswith("int") else x.astype(dtype))
    return out


def checked_elements(enc, nonfinite):
    """(end offset, tensor name, byte offset, size) of every element the checks cover, in stream order."""
    out = []
    for spec, p in zip(enc.layout.specs, enc.parts):
        if p.kid == K_Q8:
            out += [(p.offset + 4 * (i + 1), spec.name, p.offset + 4 * i, 4) for i in range(p.scales)]
        elif nonfinite and p.kid in (0, 1, 2, 3):
            size = {0: 4, 1: 8, 2: 2, 3: 2}[p.kid]
            out += [(p.offset + size * (i + 1), spec.name, p.offset + size * i, size) for i in range(spec.numel)]
    return out


def refused(buf: bytes, enc, elem) -> bool:
    """Is this element refused? Decoded by numpy from its bytes."""
    import ml_dtypes
    _, name, off, size = elem
    raw = buf[off:off + size]
    part = enc.parts[[s.name for s in enc.layout.specs].index(name)]
    if part.kid == K_Q8:
        v = float(np.frombuffer(raw, "<f4")[0])
        return not abs(v) <= MAX_SCALE
    dt = {0: np.dtype("<f4"), 1: np.dtype("<f8"), 2: np.dtype("<f2"), 3: np.dtype(ml_dtypes.bfloat16)}[part.kid]
    return not np.isfinite(np.frombuffer(raw, dt)[0].astype(np.float64))


def bad_word(size: int, choice: int) -> bytes:
    words = {2: [b"\x00\x7c", b"\x01\xfe", b"\x80\xff", b"\x80\x7f"],            # f16 Inf/NaN, bf16 -Inf/Inf
             4: [b"\x00\x00\x80\x7f", b"\x01\x00\xc0\xff", b"\x00\x00\x7f\x7f"],  # Inf, NaN, 3.39e38 (a huge scale)
             8: [b"\x00" * 6 + b"\xf0\x7f", b"\x01" + b"\x00" * 5 + b"\xf8\xff"]}[size]
    return words[choice % len(words)]


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(specs=st.lists(st.tuples(st.sampled_from(DTYPES), st.integers(1, 700)), min_size=1, max_size=5),
       encoding=st.sampled_from(list(Encoding)), nonfinite=st.booleans(),
       cuts=st.lists(st.integers(0, 10**6), max_size=6),
       bads=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 5), st.integers(0, 8)), max_size=3),
       seed=st.integers(0, 9))
def test_every_refused_element_is_found_in_the_chunk_where_it_ends(specs, encoding, nonfinite, cuts, bads, seed):
    arrays = arrays_of(specs, seed)
    enc = encoded(Layout.from_arrays(arrays), encoding)
    buf = bytearray(enc.total_size)
    for off, piece in encode_pieces(enc, arrays):
        buf[off:off + len(piece)] = piece
    elems = checked_elements(enc, nonfinite)
    inside = []   # cuts through refused elements: one begins in a chunk and ends in the next
    for at, choice, split in bads:
        if elems:
            _, _, off, size = elems[at % len(elems)]
            buf[off:off + size] = bad_word(size, choice)
            inside.append(off + split % size)
    data = bytes(buf)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts), *inside})

    # the reference: the first chunk in which a refused element ends, its first tensor, that tensor's count there
    expect = None
    for a, b in zip(bounds, bounds[1:]):
        here = [e for e in elems if a < e[0] <= b and refused(data, enc, e)]
        if here:
            first = min(here, key=lambda e: e[2])[1]
            expect = (a, first, sum(1 for e in here if e[1] == first))
            break

    checks = enc.element_checks(nonfinite)
    hs, slot, got = ContentHash(), np.zeros(len(data), np.uint8), None
    for a, b in zip(bounds, bounds[1:]):
        region, bad = hs.take(data[a:b], slot, a, checks)
        if region >= 0:
            got = (a, checks.names[region], bad)
            assert f"tensor '{got[1]}' has {bad} " in checks.why(region, bad)
            break
    assert got == expect
    if expect is None:   # nothing refused: the copy and the hash are the plain ones
        plain = ContentHash()
        plain.take(data)
        assert slot.tobytes() == data and hs.value() == plain.value()


@pytest.mark.parametrize("first", ["float64", "float32"])
def test_chunks_at_odd_offsets_across_the_kernels_blocks(first):
    """Large float tensors cut at odd byte offsets (elements straddle chunks and the kernel's
    16 KiB blocks): one NaN at the far end of each is found, nothing else is."""
    arrays = {"a": np.ones(50_000, first), "b": np.ones(70_001, np.float16), "c": np.arange(9, dtype=np.int32)}
    enc = encoded(Layout.from_arrays(arrays), Encoding.RAW)
    buf = bytearray(enc.total_size)
    for off, piece in encode_pieces(enc, arrays):
        buf[off:off + len(piece)] = piece
    a_off, b_off = enc.parts[0].offset, enc.parts[1].offset
    for cut in (1, 7, 16385, 3 * 16384 + 5):
        size = np.dtype(first).itemsize
        for where, word in ((a_off + size * 49_999, bad_word(size, 0)), (b_off + 2 * 70_000, bad_word(2, 1))):
            data = bytearray(buf)
            data[where:where + len(word)] = word
            hs, slot = ContentHash(), np.zeros(len(data), np.uint8)
            found = []
            for a in range(0, len(data), cut * 97 + 1):
                region, bad = hs.take(bytes(data[a:a + cut * 97 + 1]), slot, a, enc.element_checks(True))
                if region >= 0:
                    found.append((enc.element_checks(True).names[region], bad))
            assert found == [("a" if where < b_off else "b", 1)]


def test_the_kernel_refuses_a_chunk_that_does_not_fit_its_slot():
    from lifl import _foldc
    with pytest.raises(ValueError, match="does not fit"):
        _foldc.ingest(np.zeros(8, np.uint8), 4, b"123456789", 0, 0, None, 0.0)
    with pytest.raises(ValueError, match="int64 triples"):
        _foldc.ingest(None, 0, b"12345678", 0, 0, np.zeros((1, 3), np.int64), 1.0)
    assert kernel_id("float32") == 0


@pytest.mark.parametrize("cut", [2 << 20, 16384, 4096 + 3, 2 * 16384 + 2])
def test_every_nan_of_a_large_float32_tensor_is_counted_in_its_chunk(cut):
    """A float32 tensor larger than many of the kernel's blocks, NaN/Inf at chosen places (the
    first and last element, both ends of a block, inside the vector loop and its tail): every
    chunk reports the count a numpy check of its whole elements gives, and the first tensor."""
    x = np.random.default_rng(3).standard_normal(300_001).astype(np.float32)
    arrays = {"w": x, "n": np.arange(5, dtype=np.int64)}
    enc = encoded(Layout.from_arrays(arrays), Encoding.RAW)
    w0 = enc.parts[0].offset
    straddling = [i for i in ((k * cut - w0) // 4 for k in range(1, 6)) if i < len(x)]   # cut by a chunk boundary
    for i in (0, 1, 63, 64, 4095, 4096, 4097, 100_000, 100_001, 163_839, 300_000, *straddling):
        x[i] = np.inf if i % 2 else np.nan
    buf = bytearray(enc.total_size)
    for off, piece in encode_pieces(enc, arrays):
        buf[off:off + len(piece)] = piece
    data = bytes(buf)
    checks, hs, slot = enc.element_checks(True), ContentHash(), np.zeros(len(data), np.uint8)
    for a in range(0, len(data), cut):
        b = min(len(data), a + cut)
        first, last = max(0, (a - w0) // 4), min(len(x), max(0, (b - w0) // 4))   # elements ending in (a, b]
        want = int(np.count_nonzero(~np.isfinite(x[first:last]))) if last > first else 0
        region, bad = hs.take(data[a:b], slot, a, checks)
        assert (region, bad) == ((0, want) if want else (-1, 0)), (a, b)
    plain = ContentHash()
    plain.take(data)
    assert slot.tobytes() == data and hs.value() == plain.value()
