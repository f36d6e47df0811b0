"""Real gRPC server, real function processes, real shared memory: the global model is exact."""
import threading

import grpc

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from support import assert_matches, fedavg64, perturb, small_model
from lifl.client import Client, RpcFailure
from lifl.v1 import aggregation_pb2 as pb


@pytest.mark.parametrize("workers,leaves,fan_in", [(1, 1, 2), (2, 2, 2), (3, 3, 2), (4, 4, 4), (5, 5, 2)])
def test_hierarchy_shapes_give_the_same_exact_result(make_server, workers, leaves, fan_in):
    srv = make_server(workers=workers, leaves=leaves, fan_in=fan_in)
    base = small_model()
    ups = [perturb(base, i) for i in range(13)]
    ws = [float(i % 5 + 1) * 3.7 for i in range(13)]
    with Client(srv.address) as c:
        rid = c.open_round(base, expected=13)
        threads = [threading.Thread(target=c.push, args=(rid, u, w, f"c{i}")) for i, (u, w) in enumerate(zip(ups, ws))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = c.pull(rid, wait_s=30)
        info = c.round_info(rid)
    assert info.state == "done" and info.accepted == 13
    assert info.total_weight == pytest.approx(sum(ws))
    assert_matches(got, fedavg64(ups, ws))


@pytest.fixture(scope="module")
def shared_server():
    import uuid

    from lifl.config import ServerConfig
    from lifl.server import EmbeddedServer
    from lifl.shm import list_segments
    prefix = f"lifltest{uuid.uuid4().hex[:8]}"
    with EmbeddedServer(ServerConfig(port=0, metrics_port=-1, workers=3, leaves=3, fan_in=2,
                                     shm_prefix=prefix)) as srv:
        yield srv
    assert list_segments(prefix) == []


DT = st.sampled_from([np.float32, np.float16, np.float64, ml_dtypes.bfloat16, np.int64, np.int32])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31), n=st.integers(1, 12), dtypes=st.lists(DT, min_size=1, max_size=5))
def test_random_models_orders_and_weights(shared_server, seed, n, dtypes):
    rng = np.random.default_rng(seed)
    base = {}
    for i, dt in enumerate(dtypes):
        shape = tuple(int(x) for x in rng.integers(1, 40, size=rng.integers(0, 3)))
        base[f"p{i}"] = (rng.standard_normal(shape) * 10).astype(dt)
    ups = []
    for i in range(n):
        r = np.random.default_rng(seed + i + 1)
        ups.append({k: (r.standard_normal(v.shape) * 10).astype(v.dtype) for k, v in base.items()})
    ws = list(rng.uniform(0.01, 500, size=n))
    order = rng.permutation(n)
    with Client(shared_server.address, chunk_size=256 * 1024) as c:
        rid = c.open_round(base, expected=n)
        for i in order:
            c.push(rid, ups[i], ws[i], f"client-{i}")
        got = c.pull(rid, wait_s=30)
    assert_matches(got, fedavg64(ups, ws))


def test_large_model_many_chunks(server):
    rng = np.random.default_rng(5)
    base = {"w": rng.standard_normal(3_000_000).astype(np.float32), "b": rng.standard_normal(33).astype(np.float32)}
    ups = [{k: (v + rng.standard_normal(v.shape).astype(np.float32)) for k, v in base.items()} for _ in range(3)]
    with Client(server.address, chunk_size=1 << 20) as c:
        rid = c.open_round(base, expected=3)
        init = c.pull(rid, initial=True)    # what clients fetch while the round is open
        for i, u in enumerate(ups):
            r = c.push(rid, u, i + 1, f"c{i}")
            assert r.bytes_received == 12_000_000 + 33 * 4  # second tensor starts at an aligned 12e6
        got = c.pull(rid, wait_s=30)
        with pytest.raises(RpcFailure) as e:   # once finished, only the result is kept
            c.pull(rid, initial=True)
        assert e.value.code == grpc.StatusCode.NOT_FOUND and "no longer kept" in e.value.message
    assert_matches(got, fedavg64(ups, [1, 2, 3]))
    assert all(np.array_equal(init[k], base[k]) for k in base)


def test_next_round_from_previous_result(server):
    base = small_model()
    with Client(server.address) as c:
        r1 = c.open_round(base, expected=2)
        c.push(r1, perturb(base, 1), 1, "a")
        c.push(r1, perturb(base, 2), 1, "b")
        g1 = c.pull(r1, wait_s=10)
        r2 = c.open_round(from_round=r1, expected=1)
        assert r2 == r1 + 1
        init = c.pull(r2, initial=True)
        assert all(np.array_equal(init[k], g1[k]) for k in g1)
        d = server.dispatcher   # round 2's model is round 1's result segment, not a copy of it
        assert d.get("default", r2).initial.name == d.get("default", r1).result.name
        c.push(r2, init, 5, "a")  # the same client id is fine in a new round
        g2 = c.pull(r2, wait_s=10)
        # once round 2 is done it lets go of round 1's result; asking for it says where it is
        with pytest.raises(RpcFailure) as e:
            c.pull(r2, initial=True)
        assert e.value.code == grpc.StatusCode.NOT_FOUND and "round 1's result" in e.value.message
        again = c.pull(r1)
        assert all(np.array_equal(again[k], g1[k]) for k in g1)
    assert_matches(g2, fedavg64([g1], [5.0]))


def test_many_concurrent_pulls_share_a_small_send_budget(make_server):
    """pull_buffer_mb=1: one chunk in gRPC's hands at a time over all streams; every pull is
    still whole and exact, and a pull cancelled midway gives its turn back."""
    srv = make_server(pull_buffer_mb=1)
    rng = np.random.default_rng(3)
    base = {"w": rng.standard_normal(900_000).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}
    with Client(srv.address) as c:
        rid = c.open_round(base, expected=1)
        stream = c._pull(pb.PullRequest(round=rid, kind=pb.MODEL_KIND_INITIAL))
        next(stream), next(stream)               # header and one chunk, then walk away
        stream.cancel()
        got = [None] * 6

        def pull(i):
            with Client(srv.address) as ci:
                got[i] = ci.pull(rid, initial=True)
        threads = [threading.Thread(target=pull, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert all(g is not None and all(np.array_equal(g[k], base[k]) for k in base) for g in got)
