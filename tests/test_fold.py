"""Exactness of the fold kernels against an independent float64 FedAvg, for any order and hierarchy."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from support import assert_matches, fedavg64
from lifl import fold
from lifl.control.planner import plan_static
from lifl.layout import Layout

DTYPES = [np.float32, np.float16, np.float64, ml_dtypes.bfloat16, np.int64, np.int32, np.uint8, np.bool_]


def _model(rng, dtypes):
    out = {}
    for i, dt in enumerate(dtypes):
        shape = tuple(rng.integers(1, 6, size=rng.integers(0, 3)))
        if dt == np.bool_:
            out[f"t{i}"] = rng.random(shape) > 0.5
        elif np.dtype(dt).kind in "iu":
            out[f"t{i}"] = rng.integers(0, 100, size=shape).astype(dt)
        else:
            out[f"t{i}"] = (rng.standard_normal(shape) * 10).astype(dt)
    return out


def _like(base, rng):
    """A random update with base's shapes and dtypes."""
    out = {}
    for k, v in base.items():
        if v.dtype == np.bool_:
            out[k] = rng.random(v.shape) > 0.5
        elif v.dtype.kind in "iu":
            out[k] = rng.integers(0, 100, size=v.shape).astype(v.dtype)
        else:
            out[k] = (rng.standard_normal(v.shape) * 10).astype(v.dtype)
    return out


def aggregate_in_process(layout, updates, weights, leaves, fan_in, order, rng):
    """Run the dispatcher's reduction schedule with the pure kernels (no processes)."""
    hier = plan_static(leaves, fan_in)
    accs = [np.zeros(layout.numel) for _ in range(hier.leaves)]
    bufs = []
    for u in updates:
        b = bytearray(layout.total_size)
        layout.pack_into(u, b)
        bufs.append(b)
    # eager: updates arrive in `order`, each routed to a random leaf, folded in random batches
    pending = list(order)
    while pending:
        k = int(rng.integers(1, min(len(pending), 20) + 1))
        batch, pending = pending[:k], pending[k:]
        leaf = int(rng.integers(0, hier.leaves))
        fold.fold_updates(accs[leaf], layout, [fold.UpdateViews(layout, bufs[i]) for i in batch],
                          [weights[i] for i in batch])
    for level in range(1, hier.depth):
        for j, kids in enumerate(hier.levels[level]):
            host = hier.host(level, j)
            fold.fold_partials(accs[host], [accs[hier.host(level - 1, k)] for k in kids[1:]])
    out = bytearray(layout.total_size)
    fold.finalize(accs[hier.host(hier.depth - 1, 0)], layout, float(sum(weights)), out)
    return layout.views(out)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 40), leaves=st.integers(1, 9), fan_in=st.integers(2, 5),
       dtypes=st.lists(st.sampled_from(DTYPES), min_size=1, max_size=6))
def test_any_order_any_hierarchy_equals_float64_fedavg(seed, n, leaves, fan_in, dtypes):
    rng = np.random.default_rng(seed)
    base = _model(rng, dtypes)
    updates = [_like(base, np.random.default_rng(seed + 1 + i)) for i in range(n)]
    weights = list(rng.uniform(0.1, 1000, size=n))
    layout = Layout.from_arrays(base)
    got = aggregate_in_process(layout, updates, weights, leaves, fan_in, rng.permutation(n), rng)
    assert_matches(got, fedavg64(updates, weights))


def test_integer_counters_are_averaged_not_zeroed():
    layout = Layout.from_arrays({"n": np.array(0, np.int64), "b": np.zeros(2, bool)})
    ups = [{"n": np.array(100, np.int64), "b": np.array([True, False])},
           {"n": np.array(201, np.int64), "b": np.array([True, True])}]
    got = aggregate_in_process(layout, ups, [1.0, 1.0], 1, 2, [0, 1], np.random.default_rng(0))
    assert got["n"] == 150  # 150.5 rounds half to even
    assert got["b"].tolist() == [True, False]  # tie -> False


@pytest.mark.skipif(not fold.have_c_kernel(), reason="C kernel not built")
@pytest.mark.parametrize("kid,dt", [(0, np.float32), (1, np.float64), (2, np.float16), (3, ml_dtypes.bfloat16),
                                    (4, np.int64), (5, np.int32), (6, np.int16), (7, np.int8), (8, np.uint8)])
def test_c_kernel_equals_numpy(kid, dt, monkeypatch):
    rng = np.random.default_rng(kid)
    xs = [(rng.standard_normal(10_007) * 50).astype(dt) for _ in range(21)]
    srcs = [x.view(np.uint16) if dt == ml_dtypes.bfloat16 else x for x in xs]
    ws = list(rng.uniform(0.5, 5, 21))
    a = np.zeros(10_007)
    fold.fold_arrays(a, srcs, ws, kid)
    monkeypatch.setattr(fold, "_foldc", None)
    b = np.zeros(10_007)
    fold.fold_arrays(b, srcs, ws, kid)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-9)
    ref = sum(w * x.astype(np.float64) for w, x in zip(ws, xs))
    np.testing.assert_allclose(a, ref, rtol=1e-12, atol=1e-9)


def test_nonfinite_detection_per_dtype():
    arrays = {"a": np.array([1.0, np.nan], np.float32), "b": np.array([np.inf], np.float16),
              "c": np.array([1.0], ml_dtypes.bfloat16), "d": np.array([-np.inf, 0, np.nan], np.float64),
              "e": np.array([5], np.int64)}
    lay = Layout.from_arrays(arrays)
    buf = bytearray(lay.total_size)
    lay.pack_into(arrays, buf)
    assert fold.count_nonfinite(lay, buf) == [("a", 1), ("b", 1), ("d", 2)]


def test_finalize_refuses_zero_weight():
    lay = Layout.from_arrays({"a": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="total weight"):
        fold.finalize(np.zeros(2), lay, 0.0, bytearray(lay.total_size))


def test_nonfinite_scan_by_ranges_covers_every_element():
    """Scanning chunk by chunk (64-byte aligned cuts) finds exactly what one whole scan finds."""
    rng = np.random.default_rng(3)
    arrays = {"a": rng.standard_normal(1000).astype(np.float32), "b": rng.standard_normal(333).astype(np.float16),
              "c": rng.standard_normal(77)}
    for k, i in (("a", 0), ("a", 999), ("b", 17), ("c", 76)):
        arrays[k][i] = np.inf
    lay = Layout.from_arrays(arrays)
    buf = bytearray(lay.total_size)
    lay.pack_into(arrays, buf)
    cuts = sorted({0, lay.total_size, *(int(x) // 64 * 64 for x in rng.integers(0, lay.total_size, 9))})
    found: dict[str, int] = {}
    for a, b in zip(cuts, cuts[1:]):
        for name, n in fold.count_nonfinite(lay, buf, a, b):
            found[name] = found.get(name, 0) + n
    assert found == dict(fold.count_nonfinite(lay, buf)) == {"a": 2, "b": 1, "c": 1}


class _Cut(Exception):
    pass


def _journaled(monkeypatch, seed):
    """Small pieces, a mixed-dtype layout spanning several of them, two folds' worth of updates."""
    monkeypatch.setattr(fold, "PIECE", 8)
    rng = np.random.default_rng(seed)
    base = _model(rng, DTYPES * 3)
    layout = Layout.from_arrays(base)
    ups = [_like(base, rng) for _ in range(5)]
    bufs = []
    for u in ups:
        b = bytearray(layout.total_size)
        layout.pack_into(u, b)
        bufs.append(b)
    views = [fold.UpdateViews(layout, b) for b in bufs]
    acc = np.full(layout.numel, np.nan)               # stale bytes: the first fold must not read them
    jbuf = bytearray(fold.journal_bytes(layout.numel))
    fold.Journal(jbuf, layout.numel).gens[:] = 7      # stale generations from an earlier round
    return layout, ups, views, acc, jbuf


def _expected(layout, views, weights):
    want = np.zeros(layout.numel)
    fold.fold_updates(want, layout, views, weights)
    return want


@pytest.mark.parametrize("seed", range(4))
def test_in_place_fold_cut_short_anywhere_is_exact_when_re_run(monkeypatch, seed):
    layout, ups, views, acc, jbuf = _journaled(monkeypatch, seed)
    j = fold.Journal(jbuf, layout.numel)
    w = [1.0, 2.5, 0.5, 3.0, 1.5]
    npieces = len(j.gens)
    assert npieces >= 4
    rng = np.random.default_rng(100 + seed)
    # fold 1 (from zero, generation 11): cut inside `add` at a random piece, after writing half of it
    cut_at = int(rng.integers(npieces))
    calls = [0]
    real = fold.add_updates(layout, views[:3], w[:3])

    def flaky(out, e0, e1):
        real(out, e0, e1)
        calls[0] += 1
        if calls[0] == cut_at + 1:
            out[: len(out) // 2] = 1e300          # a half-written piece
            raise _Cut

    with pytest.raises(_Cut):
        fold.fold_in_place(acc, j, 11, None, flaky)
    fold.fold_in_place(acc, j, 11, None, real)
    np.testing.assert_array_equal(acc, _expected(layout, views[:3], w[:3]))
    assert (j.gens == 11).all()
    # fold 2 (11 -> 12): cut inside piece k while at its elements [a, b), in each step the record
    # names: 0, the kernel summing the block aside (the piece untouched there); 1, copying the
    # block's new values in (some copied); 2, a range whose old values were kept, being changed.
    # Elements before a are folded, those from b on untouched.
    before = acc.copy()
    done = acc.copy()
    jd = bytearray(jbuf)
    fold.fold_in_place(done, fold.Journal(jd, layout.numel), 12, 11, fold.add_updates(layout, views[3:], w[3:]))
    k = int(rng.integers(npieces))
    e0, e1 = k * 8, min(layout.numel, (k + 1) * 8)
    a = int(rng.integers(0, e1 - e0 + 1))
    b = int(rng.integers(a, e1 - e0 + 1))
    phase = seed % 3
    acc[:e0 + a] = done[:e0 + a]
    j.gens[:k] = 12
    j.undo[:] = -7.0                                          # stale, but for what the record names
    if phase == 0:
        j.undo[:b - a] = 1e300                                # a block half summed aside
    elif phase == 1:
        j.undo[:b - a] = done[e0 + a:e0 + b]
        acc[e0 + a:e0 + (a + b) // 2] = done[e0 + a:e0 + (a + b) // 2]   # half copied in
    else:
        j.undo[fold.KERNEL_BLOCK:fold.KERNEL_BLOCK + b - a] = before[e0 + a:e0 + b]
        acc[e0 + a:e0 + b] = 1e300                            # half-folded garbage
    j.head[:] = (k, 12, phase << 60 | a << 32 | b)
    fold.fold_in_place(acc, j, 12, 11, fold.add_updates(layout, views[3:], w[3:]))
    np.testing.assert_array_equal(acc, done)
    np.testing.assert_allclose(acc, before + _expected(layout, views[3:], w[3:]), rtol=1e-14)
    # the same command again (its reply was lost) changes nothing; a wrong generation is refused
    fold.fold_in_place(acc, j, 12, 11, fold.add_updates(layout, views[3:], w[3:]))
    np.testing.assert_array_equal(acc, done)
    with pytest.raises(RuntimeError, match="generation 12, expected 13"):
        fold.fold_in_place(acc, j, 14, 13, fold.add_partials([acc]))
    # and the result is FedAvg's
    out = bytearray(layout.total_size)
    fold.finalize(acc, layout, sum(w), out)
    assert_matches(layout.views(out), fedavg64(ups, w))


def test_finalize_arrays_casts_per_tensor_like_the_server():
    """The dict form of finalize (for code that sums on its own side): shapes and dtypes of ``like``,
    integers rounded to nearest with ties to even and clipped, bool ties False, float64 mean cast."""
    like = {"i8": np.zeros(5, np.int8), "b": np.zeros((2, 2), bool), "f": np.zeros(3, np.float32),
            "s": np.array(0, np.int64)}
    sums = {"i8": np.array([5.0, 7.0, -5.0, 1000.0, -1000.0]), "b": np.array([[1.0, 2.0], [0.0, 3.0]]),
            "f": np.array([1.0, 2.0, 1.0 / 3.0]), "s": np.array(9.0)}
    out = fold.finalize_arrays(sums, like, 2.0)
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {k: (v.dtype, v.shape) for k, v in like.items()}
    assert out["i8"].tolist() == [2, 4, -2, 127, -128]          # 2.5 -> 2, 3.5 -> 4, -2.5 -> -2, clipped
    assert out["b"].tolist() == [[False, True], [False, True]]  # 0.5 is a tie: False
    assert out["f"].tobytes() == (np.array([1.0, 2.0, 1.0 / 3.0]) / 2.0).astype(np.float32).tobytes()
    assert int(out["s"]) == 4                                    # 4.5 -> 4


def test_a_journaled_fold_records_the_last_block_it_summed_aside():
    """After an in-place fold the journal records the last block the kernel folded (the end of
    the last piece) as copied in from the undo area, which holds that block's new values."""
    rng = np.random.default_rng(5)
    n = fold.PIECE * 2 + 12_345                                # three pieces, the last one short
    acc, x = rng.standard_normal(n), rng.standard_normal(n)
    before = acc.copy()
    j = fold.Journal(bytearray(fold.journal_bytes(n)), n)
    j.gens[:] = 4
    fold.fold_in_place(acc, j, 5, 4, fold.add_partials([x]))
    last = n - 2 * fold.PIECE
    m = int(j.head[2])
    phase, a, b = m >> 60, (m >> 32) & 0x0FFFFFFF, m & 0xFFFFFFFF
    assert list(j.head[:2]) == [2, 5] and (j.gens == 5).all()
    assert phase == 1 and b == last and 0 < b - a <= fold.KERNEL_BLOCK   # one of the kernel's blocks
    np.testing.assert_array_equal(j.undo[:b - a], acc[2 * fold.PIECE + a:2 * fold.PIECE + b])
    np.testing.assert_array_equal(acc, before + x)


_FOLDER = """
import sys
import numpy as np
from lifl import fold
from lifl.shm import Segment
acc_n, j_n, x_n, numel = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
acc = Segment.attach(acc_n).array(np.float64, numel)
j = fold.Journal(Segment.attach(j_n).buf, numel)
x = Segment.attach(x_n).array(np.float64, numel)
add = fold.add_partials([x])
print("ready", flush=True)
g = 1
while True:   # generation g -> g + 1, again and again, until killed
    fold.fold_in_place(acc, j, g + 1, g, add)
    g += 1
"""


def test_a_process_killed_anywhere_in_a_journaled_fold_leaves_what_a_re_run_completes_exactly(shm_prefix):
    """A real process folds into shared memory, generation after generation, and is SIGKILLed at
    a random moment (inside the kernel's block-by-block save and fold, most of the time): the
    same command re-run here completes that generation bit for bit as the uninterrupted
    additions do. Some kills must land after part of a piece was saved (else the test proved
    nothing about the kernel's save)."""
    import signal
    import subprocess
    import sys
    import time
    from lifl.shm import Segment
    numel = 3 * fold.PIECE + 1000
    rng = np.random.default_rng(11)
    x0, acc0 = rng.standard_normal(numel), rng.standard_normal(numel)
    partial_saves = 0
    with Segment(f"{shm_prefix}-acc", 8 * numel, True) as a, Segment(f"{shm_prefix}-j", fold.journal_bytes(numel), True) as js, \
            Segment(f"{shm_prefix}-x", 8 * numel, True) as xs:
        try:
            acc, x = a.array(np.float64, numel), xs.array(np.float64, numel)
            x[:] = x0
            for trial in range(8):
                acc[:] = acc0
                j = fold.Journal(js.buf, numel)
                j.gens[:] = 1
                j.head[:] = (-1, -1, 0)
                p = subprocess.Popen([sys.executable, "-c", _FOLDER, a.name, js.name, xs.name, str(numel)],
                                     stdout=subprocess.PIPE, text=True)
                assert p.stdout.readline().strip() == "ready"
                time.sleep(float(rng.uniform(0.02, 0.2)))
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=30)
                p.stdout.close()
                g = int(j.gens.min())
                if j.head[1] == g + 1 and 0 < (int(j.head[2]) >> 32) & 0x0FFFFFFF:   # resumed inside a piece
                    partial_saves += 1
                fold.fold_in_place(acc, j, g + 1, g, fold.add_partials([x]))
                want = acc0.copy()
                for _ in range(g):
                    want += x0
                np.testing.assert_array_equal(acc, want)
                assert (j.gens == g + 1).all()
        finally:
            for seg in (a, js, xs):
                seg.unlink()
    assert partial_saves >= 2
