"""Compressed update encodings (FLOAT16, BFLOAT16, INT8_BLOCK256): folded exactly as their decoded
values, refused when malformed.

The reference decodes the pushed bytes with the contract's arithmetic, independently of lifl
(``support.decode``), and averages them in float64."""
from __future__ import annotations

import subprocess
import sys
import time

import grpc
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from support import assert_matches, decode, expect, fedavg64, perturb, small_model, wire_bytes
from lifl import encoding, fold
from lifl.client import Client
from lifl.layout import Layout
from lifl.v1 import aggregation_pb2 as pb
from lifl.wire import encode_chunk

CODES = {"raw": 1, "float16": 2, "bfloat16": 3, "int8": 4}
BASE = small_model()
LAYOUT = Layout.from_arrays(BASE)


def header(rid, name="int8", total=None, client="x", layout=LAYOUT, n=1.0, code=None) -> bytes:
    enc = encoding.encoded(layout, encoding.parse(name))
    h = pb.PushHeader(job="default", round=rid, client_id=client, num_examples=n,
                      total_size=enc.total_size if total is None else total,
                      encoding=CODES[name] if code is None else code)
    layout.to_proto(h.tensors)
    return pb.PushRequest(header=h).SerializeToString()


# -- kernels, in process ----------------------------------------------------------------------------
@pytest.fixture(params=["c", "numpy"])
def kernel(request, monkeypatch):
    if request.param == "c":
        if not fold.have_c_kernel():
            pytest.skip("C kernel not built")
    else:
        monkeypatch.setattr(fold, "_foldc", None)
    return request.param


def test_float16_words_decode_exactly_all_65536(kernel):
    words = np.arange(65536, dtype=np.uint16)
    finite = np.isfinite(words.view(np.float16))
    acc = np.zeros(int(finite.sum()))
    fold.fold_arrays(acc, [words[finite].view(np.float16)], [1.0], encoding.K_F16)
    assert np.array_equal(acc, words[finite].view(np.float16).astype(np.float64))


@pytest.mark.parametrize("n", [1, 3, 4, 7, 4095, 4097, 10_001])
@pytest.mark.parametrize("kid", [encoding.K_F16, encoding.K_BF16])
def test_16bit_words_any_length_any_fuse(kernel, n, kid):
    rng = np.random.default_rng(n)
    exp_mask = 0x7C00 if kid == encoding.K_F16 else 0x7F80
    words = [rng.integers(0, 65536, n).astype(np.uint16) for _ in range(7)]   # 4 fused + 3 alone
    for wd in words:
        wd[(wd & exp_mask) == exp_mask] = 0
    srcs = [wd.view(np.float16) if kid == encoding.K_F16 else wd for wd in words]
    dec = [wd.view(np.float16).astype(np.float64) if kid == encoding.K_F16
           else (wd.astype(np.uint32) << 16).view(np.float32).astype(np.float64) for wd in words]
    w = list(rng.uniform(0.1, 100, 7))
    acc = np.zeros(n)
    fold.fold_arrays(acc, srcs, w, kid)
    terms = [wk * d for wk, d in zip(w, dec)]
    assert (np.abs(acc - sum(terms)) <= 1e-13 * sum(np.abs(t) for t in terms)).all()


@pytest.mark.parametrize("n,a,b", [(1, 0, 1), (255, 3, 250), (256, 0, 256), (1000, 255, 1000), (5000, 17, 4097),
                                   (70_000, 123, 69_999), (513, 256, 257)])
def test_int8_blocks_any_run_of_elements(kernel, n, a, b):
    rng = np.random.default_rng(n + a)
    k = 7   # more than one fused group of 4
    srcs = [fold.Q8(rng.standard_normal(-(-n // 256)).astype(np.float32) * 1e3,
                    rng.integers(-128, 128, n).astype(np.int8)) for _ in range(k)]
    w = list(rng.uniform(0.1, 100, k))
    acc = np.full(b - a, 0.5)
    fold.fold_arrays(acc, [s[a:b] for s in srcs], w, encoding.K_Q8)
    terms = [wk * (s.values.astype(np.float64) * np.repeat(s.scales.astype(np.float64), 256)[:n])[a:b]
             for s, wk in zip(srcs, w)]
    ref = 0.5 + sum(terms)
    assert (np.abs(acc - ref) <= 1e-13 * (0.5 + sum(np.abs(t) for t in terms))).all()   # rounding, not decoding


def _random_slot(layout, arrays_like, name, rng):
    """Random valid encoded bytes (extremes included) in a slot, and their decoded arrays."""
    enc = encoding.encoded(layout, encoding.parse(name))
    buf = bytearray(enc.slot_size)
    pos = 0
    for k, a in arrays_like.items():
        pos = -(-pos // 64) * 64
        n = a.size
        if a.dtype.kind == "f" and a.dtype.itemsize >= 4 and name != "raw":
            if name in ("float16", "bfloat16"):
                exp_mask = 0x7C00 if name == "float16" else 0x7F80
                w = rng.integers(0, 65536, n).astype(np.uint16)
                w[(w & exp_mask) == exp_mask] &= ~np.uint16(0x0400 if name == "float16" else 0x0080)
                buf[pos:pos + 2 * n] = w.tobytes()
                pos += 2 * n
            else:
                nb = -(-n // 256)
                s = (rng.standard_normal(nb) * 10.0 ** rng.integers(-40, 37, nb)).astype(np.float32)
                s[:1] = np.float32(encoding.MAX_SCALE) * rng.choice([-1, 1])      # the largest scale allowed
                buf[pos:pos + 4 * nb] = s.astype("<f4").tobytes()
                buf[pos + 4 * nb:pos + 4 * nb + n] = rng.integers(-128, 128, n).astype(np.int8).tobytes()
                pos += 4 * nb + n
        else:
            buf[pos:pos + a.nbytes] = np.ascontiguousarray(a).tobytes()
            pos += a.nbytes
    assert pos == enc.total_size              # the contract's arithmetic is lifl's
    encoding.write_trailer(enc, buf)
    return buf, decode(arrays_like, bytes(buf[:enc.total_size]), name)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), n=st.integers(1, 12),
       sizes=st.lists(st.integers(0, 1100), min_size=1, max_size=4))
def test_mixed_encodings_fold_to_the_decoded_fedavg(kernel, seed, n, sizes):
    rng = np.random.default_rng(seed)
    like = {f"t{i}": np.zeros(m, np.float32 if i % 3 else np.float64) for i, m in enumerate(sizes)}
    like["count"] = np.array([7], np.int64)
    layout = Layout.from_arrays(like)
    names = [str(rng.choice(list(CODES)[1:])) for _ in range(n)]
    slots, decoded = zip(*(_random_slot(layout, like, nm, rng) for nm in names))
    weights = list(rng.uniform(0.1, 1000, n))
    acc = np.zeros(layout.numel)
    fold.fold_updates(acc, layout, [fold.UpdateViews(layout, s) for s in slots], weights)
    out = bytearray(layout.total_size)
    fold.finalize(acc, layout, float(sum(weights)), out)
    assert_matches(layout.views(out), fedavg64(list(decoded), weights))


def test_in_place_pieces_cut_int8_blocks_anywhere(kernel):
    """The journaled fold works piece by piece (fold.PIECE elements): a piece boundary inside a
    tensor falls inside an int8 block."""
    rng = np.random.default_rng(3)
    like = {"a": np.zeros(1000, np.float32), "b": np.zeros(300_001, np.float32)}   # b's blocks straddle pieces
    layout = Layout.from_arrays(like)
    slots, decoded = zip(*(_random_slot(layout, like, "int8", rng) for _ in range(5)))
    weights = list(rng.uniform(1, 10, 5))
    acc = np.zeros(layout.numel)
    journal = fold.Journal(bytearray(fold.journal_bytes(layout.numel)), layout.numel)
    fold.fold_in_place(acc, journal, 1, None,
                       fold.add_updates(layout, [fold.UpdateViews(layout, s) for s in slots], weights))
    ref = fedavg64(list(decoded), weights)
    tw = sum(weights)
    np.testing.assert_allclose(acc[1000:] / tw, ref["b"], rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(acc[:1000] / tw, ref["a"], rtol=1e-12, atol=1e-300)


def test_a_reused_slot_is_read_in_its_new_encoding():
    """float16 and bfloat16 slots have the same size, so one slot serves both in turn; a function's
    cached views must follow the slot's current encoding."""
    like = {"w": np.zeros(300, np.float32)}
    layout = Layout.from_arrays(like)
    rng = np.random.default_rng(0)
    f16, dec16 = _random_slot(layout, like, "float16", rng)
    bf16, dec_bf = _random_slot(layout, like, "bfloat16", rng)
    assert len(f16) == len(bf16)
    slot = bytearray(f16)
    views = fold.UpdateViews(layout, slot)
    slot[:] = bf16
    acc = np.zeros(300)
    fold.fold_updates(acc, layout, [views], [1.0])
    assert np.array_equal(acc, dec_bf["w"].reshape(-1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])   # float32: the C quantiser when built
def test_client_side_quantiser_is_blockwise_absmax(dtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(1000) * np.repeat(10.0 ** rng.integers(-3, 4, 4), 256)[:1000]).astype(dtype)
    scales, q = encoding.quantize_int8(x)
    assert scales.shape == (4,) and q.dtype == np.int8
    absmax = np.abs(np.pad(x, (0, 24))).reshape(4, 256).max(axis=1)
    np.testing.assert_allclose(scales, absmax / 127, rtol=1e-7)
    err = np.abs(q * np.repeat(scales.astype(np.float64), 256)[:1000] - x)
    assert (err <= np.repeat(scales, 256)[:1000] * (0.5 + 1e-4)).all()   # half a step (+ float32 division)
    assert np.array_equal(encoding.quantize_int8(np.zeros(300, dtype))[0], np.zeros(2, np.float32))


def test_encoded_sizes_follow_the_contract():
    # w: 1M float32 elements; n: an int64 counter at the next 64-byte boundary, never encoded
    lay = Layout.from_arrays({"w": np.zeros(1_000_000, np.float32), "n": np.zeros((), np.int64)})
    sizes = {nm: encoding.encoded(lay, encoding.parse(nm)).total_size for nm in CODES}
    assert sizes == {"raw": 4_000_008, "float16": 2_000_008, "bfloat16": 2_000_008,
                     "int8": 1_015_680 + 8}          # 4 * 3907 scales + 1M int8 = 1,015,628 -> aligned 1,015,680
    assert sizes["int8"] / sizes["raw"] <= 0.27
    slots = {nm: encoding.encoded(lay, encoding.parse(nm)).slot_size for nm in CODES}
    assert slots["raw"] == sizes["raw"] and all(slots[nm] == sizes[nm] + 64 for nm in ("float16", "int8"))


# -- through a real server ---------------------------------------------------------------------------
def _settled(c: Client, rid: int) -> None:
    """Wait (bounded) until no push is in flight and no update slot is held, as Status reports."""
    deadline = time.monotonic() + 5
    while c.round_info(rid).in_flight or c.status().slots_in_use:
        assert time.monotonic() < deadline, "pushes still in flight or slots still held"
        time.sleep(0.02)


def check_round(address: str, base: dict, ups: list, names: list, weights: list) -> None:
    """Open a round, push each update in its encoding, pull: the result is the float64 FedAvg of
    the decoded updates, and each receipt counts the encoded bytes."""
    lay = Layout.from_arrays(base)
    with Client(address) as c:
        rid = c.open_round(base, expected=len(ups))
        for i, (u, nm, w) in enumerate(zip(ups, names, weights)):
            r = c.push(rid, u, w, f"c{i}", encoding=nm)
            assert r.bytes_received == encoding.encoded(lay, encoding.parse(nm)).total_size
        got = c.pull(rid, wait_s=30)
    assert_matches(got, fedavg64([decode(u, wire_bytes(u, nm), nm) for u, nm in zip(ups, names)], weights))


def test_every_encoding_through_the_server_equals_the_decoded_fedavg(server):
    """Mixed encodings in one round (and extremes each encoding can carry) against a float64
    FedAvg of what was sent, decoded here."""
    ups = [perturb(BASE, i) for i in range(8)]
    ups[5]["conv.weight"].flat[:4] = [65504.0, -65504.0, 6e-8, -1e-7]       # float16's extremes
    ups[6]["conv.weight"].flat[:3] = [3.0e38, -1e-38, 1e-40]                  # bfloat16's range
    ups[7]["bn.running_mean"][:] = np.linspace(-3e38, 3e38, 16)               # huge int8 scales
    names = ["raw", "float16", "bfloat16", "int8", "int8", "float16", "bfloat16", "int8"]
    weights = [3.0, 1.0, 7.5, 2.0, 11.0, 0.5, 4.0, 9.0]
    check_round(server.address, BASE, ups, names, weights)


def test_each_bad_encoded_push_is_refused_and_changes_nothing(make_server):
    srv = make_server(reject_nonfinite=True)
    good = [perturb(BASE, i) for i in range(2)]
    q8 = bytearray(wire_bytes(good[0], "int8"))
    nb = -(-BASE["conv.weight"].size // 256)            # conv.weight is the first tensor: its scales lead

    def with_scale(value):
        b = bytearray(q8)
        b[4:8] = np.float32(value).tobytes()
        return bytes(b)

    def with_word(name, word):
        b = bytearray(wire_bytes(good[0], name))
        b[10:12] = np.uint16(word).tobytes()
        return bytes(b)

    def blocks_of_64(arrays):   # a client quantising with another block size
        out, pos = bytearray(), 0
        for a in arrays.values():
            out += bytes(-len(out) % 64)
            if a.dtype.kind == "f" and a.dtype.itemsize >= 4:
                flat = a.reshape(-1).astype(np.float64)
                nb64 = -(-flat.size // 64)
                out += np.ones(nb64, "<f4").tobytes() + np.zeros(flat.size, np.int8).tobytes()
            else:
                out += a.tobytes()
        return bytes(out)

    with Client(srv.address, retry_s=0) as c:
        rid = c.open_round(BASE, expected=2)
        IA = grpc.StatusCode.INVALID_ARGUMENT
        for value in (np.nan, np.inf, -np.inf, 1e37):
            expect(IA, "scale", c.push_raw, iter([header(rid), encode_chunk(with_scale(value))]))
        expect(IA, "NaN/Inf", c.push_raw, iter([header(rid, "float16"), encode_chunk(with_word("float16", 0x7C00))]))
        expect(IA, "NaN/Inf", c.push_raw, iter([header(rid, "float16"), encode_chunk(with_word("float16", 0xFE01))]))
        expect(IA, "NaN/Inf", c.push_raw, iter([header(rid, "bfloat16"), encode_chunk(with_word("bfloat16", 0xFF80))]))
        wrong = blocks_of_64(good[0])
        e = expect(IA, "total_size", c.push_raw, iter([header(rid, total=len(wrong)), encode_chunk(wrong)]))
        assert "block of 256" in e.message and f"{nb} scales" in e.message
        raw_size = LAYOUT.total_size
        expect(IA, "2 bytes per element", c.push_raw, iter([header(rid, "float16", total=raw_size),
                                                            encode_chunk(wire_bytes(good[0], "raw"))]))
        expect(IA, "stream ended after", c.push_raw, iter([header(rid), encode_chunk(bytes(q8[:100]))]))
        expect(IA, "more bytes than", c.push_raw, iter([header(rid), encode_chunk(bytes(q8) + b"\0")]))
        for code in (5, 99, -1):
            expect(IA, "encoding", c.push_raw, iter([header(rid, code=code), encode_chunk(bytes(q8))]))
        with pytest.raises(ValueError, match="float16's range"):
            c.push(rid, {**good[0], "conv.weight": good[0]["conv.weight"] * 1e5}, 1, "x", encoding="float16")
        with pytest.raises(ValueError, match="unknown encoding"):
            c.push(rid, good[0], 1, "x", encoding="int4")
        info = c.round_info(rid)
        assert (info.accepted, info.in_flight, info.total_weight) == (0, 0, 0.0)
        _settled(c, rid)
        # the round is untouched: two good pushes give exactly their decoded mean
        c.push(rid, good[0], 2.0, "a", encoding="int8")
        c.push(rid, good[1], 5.0, "b", encoding="bfloat16")
        got = c.pull(rid, wait_s=30)
    assert_matches(got, fedavg64([decode(good[0], bytes(q8), "int8"),
                                  decode(good[1], wire_bytes(good[1], "bfloat16"), "bfloat16")], [2.0, 5.0]))


def test_scales_are_checked_even_with_reject_nonfinite_off(make_server):
    srv = make_server(reject_nonfinite=False)
    q8 = bytearray(wire_bytes(BASE, "int8"))
    q8[4:8] = np.float32(np.nan).tobytes()
    with Client(srv.address, retry_s=0) as c:
        rid = c.open_round(BASE, expected=1)
        expect(grpc.StatusCode.INVALID_ARGUMENT, "scale", c.push_raw, iter([header(rid), encode_chunk(bytes(q8))]))
        assert c.round_info(rid).accepted == 0
        c.close_round(rid, abort=True)


def test_cli_push_with_an_encoding(server, tmp_path):
    ups = [perturb(BASE, i) for i in range(2)]
    with Client(server.address) as c:
        rid = c.open_round(BASE, expected=2)
        c.push(rid, ups[0], 1.0, "c0", encoding="bfloat16")
        np.savez(tmp_path / "u.npz", **ups[1])
        p = subprocess.run([sys.executable, "-m", "lifl", "push", "--address", server.address, "--round", str(rid),
                            "--client", "c1", "--num-examples", "2", "--encoding", "int8", str(tmp_path / "u.npz")],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert f"{encoding.encoded(LAYOUT, encoding.Encoding.INT8_BLOCK256).total_size} bytes" in p.stdout
        got = c.pull(rid, wait_s=30)
    assert_matches(got, fedavg64([decode(u, wire_bytes(u, nm), nm) for u, nm in zip(ups, ["bfloat16", "int8"])],
                                 [1.0, 2.0]))


def test_client_refuses_values_an_encoding_cannot_carry():
    lay = {"w": np.ones(300, np.float32)}
    enc = {nm: encoding.encoded(Layout.from_arrays(lay), encoding.parse(nm)) for nm in CODES}
    for nm, bad, why in [("float16", 7e4, "float16's range"), ("float16", np.nan, "NaN/Inf"),
                         ("bfloat16", np.inf, "NaN/Inf"), ("int8", np.nan, "NaN/Inf"), ("int8", -np.inf, "NaN/Inf")]:
        arr = {"w": lay["w"].copy()}
        arr["w"][299] = bad
        with pytest.raises(ValueError, match=why):
            encoding.encode_pieces(enc[nm], arr)
    with pytest.raises(ValueError, match="float32's range"):
        encoding.encode_pieces(encoding.encoded(Layout.from_arrays({"w": np.ones(3)}), encoding.Encoding.INT8_BLOCK256),
                               {"w": np.array([1.0, 1e39, 2.0])})
    # float32's largest values still quantise (scale capped, decoded values stay finite float32)
    scales, q = encoding.quantize_int8(np.array([np.finfo(np.float32).max, 1.0], np.float32))
    assert scales[0] == np.float32(encoding.MAX_SCALE) and np.isfinite(q[0] * np.float64(scales[0]))


def test_a_slot_is_never_mistaken_for_another_encoding():
    """float32[32]: RAW is 128 bytes and FLOAT16 64 + a 64-byte trailer would be 128 too; the
    encoded slot is made one line longer so a slot's size alone tells RAW apart."""
    lay = Layout.from_arrays({"w": np.zeros(32, np.float32)})
    raw, f16 = (encoding.encoded(lay, encoding.parse(nm)) for nm in ("raw", "float16"))
    assert raw.slot_size == 128 and f16.total_size == 64 and f16.slot_size == 192
    rng = np.random.default_rng(0)
    like = {"w": np.zeros(32, np.float32)}
    for nm in ("raw", "float16"):
        buf, dec = _random_slot(lay, like, nm, rng)
        assert encoding.slot_encoding(lay, buf).encoding is encoding.parse(nm)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), sizes=st.lists(st.sampled_from([0, 1, 31, 32, 255, 256, 257, 600]), min_size=1,
                                                  max_size=3))
def test_random_layouts_through_the_server(server, seed, sizes):
    rng = np.random.default_rng(seed)
    base = {f"t{i}": np.zeros(m, np.float32 if i % 2 == 0 else np.float64) for i, m in enumerate(sizes)}
    base["n"] = np.array([3], np.int64)
    ups, names = [], []
    for k in range(4):
        nm = list(CODES)[k]
        u = {key: (rng.standard_normal(v.shape) * 10.0 ** rng.integers(-20, 4)).astype(v.dtype) if v.dtype.kind == "f"
             else v + k for key, v in base.items()}
        ups.append(u)
        names.append(nm)
    weights = list(rng.uniform(0.5, 50, 4))
    check_round(server.address, base, ups, names, weights)


def test_encoded_updates_over_the_pipe_transport(make_server):
    """The ``update_transport = "pipe"`` ablation sends each slot to the function over its socket:
    the whole slot travels, trailer included, and the result is the same."""
    srv = make_server(update_transport="pipe")
    ups = [perturb(BASE, 40 + i) for i in range(4)]
    names, weights = list(CODES), [1.0, 2.0, 3.0, 4.0]
    check_round(srv.address, BASE, ups, names, weights)


def _clipped_reference(u: dict, nm: str, factor: float) -> dict:
    """The decoded update after an L2 clip by ``factor`` applied in its encoding, computed here:
    int8 scales × factor rounded to float32 (values unchanged); 16-bit words and raw floats decoded,
    × factor in float64, rounded once to their own format."""
    buf, pos = bytearray(wire_bytes(u, nm)), 0
    raw = {}
    for k, a in u.items():
        pos = -(-pos // 64) * 64
        n = a.size
        if a.dtype.kind == "f" and a.dtype.itemsize >= 4 and nm != "raw":
            if nm == "int8":
                nb = -(-n // 256)
                s = np.frombuffer(buf, "<f4", nb, pos)
                buf[pos:pos + 4 * nb] = (s.astype(np.float64) * factor).astype("<f4").tobytes()
                pos += 4 * nb + n
            else:
                dt = np.dtype("<f2") if nm == "float16" else np.dtype(ml_dtypes.bfloat16)
                v = np.frombuffer(buf, dt, n, pos)
                buf[pos:pos + 2 * n] = (v.astype(np.float64) * factor).astype(dt).tobytes()
                pos += 2 * n
            raw[k] = a
        else:
            raw[k] = (a.astype(np.float64) * factor).astype(a.dtype) if a.dtype.kind == "f" else a
            pos += a.nbytes
    return decode(raw, bytes(buf), nm)


def test_l2_screening_sees_decoded_values_and_clips_in_the_encoding(make_server):
    """screen_l2_max measures each update's norm over its decoded float values; clip scales it in
    its own encoding (int8: the scales), reject refuses it and stores nothing."""
    names = ["int8", "float16", "bfloat16", "raw"]
    ups = [perturb(BASE, 60 + i) for i in range(4)]
    decoded = [decode(u, wire_bytes(u, nm), nm) for u, nm in zip(ups, names)]
    norms = [float(np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for k, v in d.items() if BASE[k].dtype.kind == "f")))
             for d in decoded]
    bound = min(norms) / 2
    weights = [1.0, 2.0, 3.0, 4.0]
    srv = make_server(screen_l2_max=bound, screen_mode="clip")
    with Client(srv.address) as c:
        rid = c.open_round(BASE, expected=4)
        for i, (u, nm, w) in enumerate(zip(ups, names, weights)):
            c.push(rid, u, w, f"c{i}", encoding=nm)
        got = c.pull(rid, wait_s=30)
    assert_matches(got, fedavg64([_clipped_reference(u, nm, bound / n) for u, nm, n in zip(ups, names, norms)],
                                 weights))
    strict = make_server(screen_l2_max=bound, screen_mode="reject")
    with Client(strict.address, retry_s=0) as c:
        rid = c.open_round(BASE, expected=1)
        e = expect(grpc.StatusCode.INVALID_ARGUMENT, "L2 norm", c.push, rid, ups[0], 1.0, "x", encoding="int8")
        assert f"{norms[0]:.6g}" in e.message     # the decoded update's norm
        assert c.round_info(rid).accepted == 0
        c.close_round(rid, abort=True)
