"""Update screening by L2 norm on a real server: clipped updates fold to exactly the float64 FedAvg
of the clipped updates (numpy reference), rejected ones change nothing; both are counted."""
import grpc
import ml_dtypes
import numpy as np
import pytest

from support import assert_matches, expect, fedavg64, metric, perturb, small_model
from lifl.client import Client
from lifl.config import ServerConfig
from lifl.fold import sum_squares
from lifl.layout import Layout


def model(seed=0):
    rng = np.random.default_rng(seed)
    m = small_model(seed)
    m["big.weight"] = rng.standard_normal(150_000).astype(np.float32)       # several 256 KiB chunks
    m["emb.weight"] = rng.standard_normal((40, 33)).astype(ml_dtypes.bfloat16)
    return m


def norm64(u):
    """Reference L2 norm: float tensors only, in float64."""
    return float(np.sqrt(sum(np.sum(np.asarray(v).astype(np.float64) ** 2) for v in u.values()
                             if np.asarray(v).dtype.kind == "f" or np.asarray(v).dtype == ml_dtypes.bfloat16)))


def clipped(u, bound):
    """Reference clip: each float tensor scaled by bound/norm in float64, rounded once to its dtype."""
    scale = min(1.0, bound / norm64(u))
    return {k: (np.asarray(v).astype(np.float64) * scale).astype(v.dtype)
            if (v.dtype.kind == "f" or v.dtype == ml_dtypes.bfloat16) else v for k, v in u.items()}


BASE = model()
UPS = [perturb(BASE, i + 1) for i in range(4)]
WEIGHTS = [1.0, 2.0, 3.0, 5.0]


def screened(srv, action):
    return metric(srv, "lifl_updates_screened_total", action=action)


def test_sum_of_squares_over_any_chunking_is_the_norm():
    layout = Layout.from_arrays(BASE)
    buf = bytearray(layout.total_size)
    layout.pack_into(BASE, buf)
    cuts = [0, 64, 4096, 123 * 64, 300_000 - 300_000 % 64, layout.total_size]
    total = sum(sum_squares(layout, buf, a, b) for a, b in zip(cuts, cuts[1:]))
    assert total == pytest.approx(norm64(BASE) ** 2, rel=1e-12)


@pytest.mark.parametrize("c_kernel", [True, False])
def test_one_pass_scan_counts_nonfinite_and_squares_per_dtype(c_kernel, monkeypatch):
    from lifl import fold
    if c_kernel and not fold.have_c_kernel():
        pytest.skip("C kernel not built")
    if not c_kernel:
        monkeypatch.setattr(fold, "_foldc", None)
    rng = np.random.default_rng(3)
    arrays = {k: (rng.standard_normal(1001) * 3).astype(dt) for k, dt in
              (("a", np.float32), ("b", np.float64), ("c", np.float16), ("d", ml_dtypes.bfloat16))}
    arrays["n"] = np.arange(7, dtype=np.int64)                              # not measured
    arrays["c"][[5, 17]] = [np.inf, np.nan]
    layout = Layout.from_arrays(arrays)
    buf = bytearray(layout.total_size)
    layout.pack_into(arrays, buf)
    bad, sq = fold.scan_floats(layout, buf)
    assert bad == [("c", 2)] and not np.isfinite(sq)
    arrays["c"][[5, 17]] = 0
    layout.pack_into(arrays, buf)
    bad, sq = fold.scan_floats(layout, buf)
    ref = sum(float(np.sum(arrays[k].astype(np.float64) ** 2)) for k in "abcd")
    assert bad == [] and sq == pytest.approx(ref, rel=1e-13)


def test_clip_folds_to_the_fedavg_of_clipped_updates(make_server):
    norms = sorted(norm64(u) for u in UPS)
    bound = (norms[1] + norms[2]) / 2                                       # two updates over, two under
    srv = make_server(screen_l2_max=bound, screen_mode="clip")
    with Client(srv.address, chunk_size=256 * 1024) as c:
        rid = c.open_round(BASE, expected=len(UPS))
        for i, (u, w) in enumerate(zip(UPS, WEIGHTS)):
            c.push(rid, u, w, f"c{i}")
        got = c.pull(rid, wait_s=30)
    assert_matches(got, fedavg64([clipped(u, bound) for u in UPS], WEIGHTS))
    with pytest.raises(AssertionError):                                    # and not the unclipped average
        assert_matches(got, fedavg64(UPS, WEIGHTS))
    assert screened(srv, "clipped") == 2 and screened(srv, "rejected") == 0


def test_reject_refuses_updates_over_the_bound_and_stores_nothing(make_server):
    norms = [norm64(u) for u in UPS]
    bound = sorted(norms)[1] * 1.0001
    over = [i for i, n in enumerate(norms) if n > bound]
    srv = make_server(screen_l2_max=bound)                                 # screen_mode defaults to reject
    with Client(srv.address, chunk_size=256 * 1024, retry_s=0) as c:
        rid = c.open_round(BASE, expected=len(UPS) - len(over))
        for i in over:
            expect(grpc.StatusCode.INVALID_ARGUMENT, "screen_l2_max", c.push, rid, UPS[i], 1, f"c{i}")
        info = c.round_info(rid)
        assert (info.accepted, info.in_flight, info.total_weight) == (0, 0, 0.0)
        keep = [i for i in range(len(UPS)) if i not in over]
        for i in keep:
            c.push(rid, UPS[i], WEIGHTS[i], f"c{i}")
        got = c.pull(rid, wait_s=30)
    assert_matches(got, fedavg64([UPS[i] for i in keep], [WEIGHTS[i] for i in keep]))
    assert screened(srv, "rejected") == len(over) == 2
    assert metric(srv, "lifl_updates_rejected_total", reason="invalid_argument") == 2
    assert srv.arena.stats().slots_in_use == 0


def test_screening_settings_are_checked():
    for bad in ({"screen_l2_max": -1.0}, {"screen_l2_max": float("nan")}, {"screen_mode": "trim"}):
        with pytest.raises(ValueError, match="screen_"):
            ServerConfig(**bad).validate()
