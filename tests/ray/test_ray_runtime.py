"""The Ray runtime on a real local Ray cluster of three nodes with distinct resources.

One cluster per module (starting Ray nodes is the slow part). Every server here
runs its aggregator functions as Ray actors on the cluster's nodes and a gateway
per node; clients push to the gateway of "their" node, as they would across
machines. Nothing is mocked.
"""
from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from lifl.client import Client, RpcFailure  # noqa: E402
from lifl.config import ServerConfig  # noqa: E402
from lifl.layout import Layout  # noqa: E402
from lifl.server import EmbeddedServer  # noqa: E402
from lifl.shm import list_segments  # noqa: E402
from support import FlowerStep, assert_matches, expect, fedavg64, metric, perturb, small_model  # noqa: E402

import grpc  # noqa: E402


def _start_cluster() -> Cluster:
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"lifl_head": 1}})
    try:
        c.add_node(num_cpus=2, resources={"lifl_a": 1})
        c.add_node(num_cpus=3, resources={"lifl_b": 1})
        c.wait_for_nodes()
    except BaseException:
        c.shutdown()
        raise
    return c


@pytest.fixture(scope="module")
def cluster():
    try:
        c = _start_cluster()
    except Exception:  # a raylet that misses Ray's start-up deadline on a loaded 2-core machine
        time.sleep(5)
        c = _start_cluster()
    ray.init(address=c.address, namespace=f"lifl-test-{uuid.uuid4().hex[:6]}", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture
def ray_server(cluster):
    prefix = f"lifltest{uuid.uuid4().hex[:8]}"
    servers = []

    def make(**kw) -> EmbeddedServer:
        kw.setdefault("port", 0)
        kw.setdefault("metrics_port", -1)
        kw.setdefault("planner", "static")
        kw.setdefault("leaves", 1)
        kw.setdefault("fan_in", 2)
        kw.setdefault("workers", 8)
        srv = EmbeddedServer(ServerConfig(runtime="ray", shm_prefix=prefix, **kw)).start()
        servers.append(srv)
        return srv

    yield make
    for s in servers:
        s.stop()
    assert list_segments(prefix) == [], "shared-memory segments leaked"


def _push_spread(srv, rid, updates, weights, names=None):
    """Client i pushes to gateway i mod nodes; returns {client: node}."""
    gws = sorted(srv.gateways().items())
    where = {}
    for i, (u, w) in enumerate(zip(updates, weights)):
        node, addr = gws[i % len(gws)]
        cid = (names or [f"c{j}" for j in range(len(updates))])[i]
        with Client(addr) as c:
            c.push(rid, u, w, cid)
        where[cid] = node
    return where


def _scrape(srv) -> dict[str, float]:
    """The head's real /metrics over HTTP: {'name{labels}': value}."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=30).read().decode()
    return {k: float(v) for k, v in (ln.rsplit(" ", 1) for ln in text.splitlines() if ln and ln[0] != "#")}


def _actor_node(worker) -> str:
    """Ask the actor itself where it runs (not what the runtime believes)."""
    import json
    return "node-" + json.loads(ray.get(worker.actor.ready.remote()))["ray_node"][:8]


def _dies(actor, within_s: float = 30.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ready.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.2)
    return False


def test_three_nodes_exact_placed_and_only_partials_cross(ray_server, cluster):
    srv = ray_server(metrics_port=0)
    rt = srv.runtime
    assert len(rt.node_models()) == 3 and len(srv.gateways()) == 3
    assert sorted(n.cores for n in rt.node_models()) == [2.0, 2.0, 3.0]
    base = small_model(1)
    updates = [perturb(base, s) for s in range(9)]
    weights = [float(1 + s % 4) for s in range(9)]
    with Client(srv.address) as admin:
        rid = admin.open_round(base, expected=9)
        before = dict(rt.crossed)
        _push_spread(srv, rid, updates, weights)
        got = admin.pull(rid, wait_s=60)
    assert_matches(got, fedavg64(updates, weights))

    view = srv.snapshot().round(rid)
    actors = {w.id: w for w in rt.workers()}
    # locality: every leaf runs on the node whose gateway fed it, and the actor really is there
    assert [leaf.node for leaf in view.leaves] == [leaf.home for leaf in view.leaves]
    assert sorted({leaf.node for leaf in view.leaves}) == sorted(srv.gateways())
    for leaf in view.leaves:
        assert not leaf.function or _actor_node(actors[leaf.function]) == leaf.node
    for w in srv.snapshot().functions:
        assert _actor_node(actors[w.id]) == w.node
    # bytes between nodes: partial sums only, exactly what the placement predicted
    crossed = {k: rt.crossed[k] - before[k] for k in before}
    layout = Layout.from_arrays(base)
    partial = layout.numel * 8
    assert crossed["update"] == 0
    assert crossed["partial"] == view.partial_bytes_crossing > 0
    assert crossed["partial"] % partial == 0
    assert crossed["result"] in (0, layout.total_size)  # the model goes to the head once at most
    # the head's /metrics sums its own gateway's bytes and both node gateways' (their agents' registries)
    assert _scrape(srv)["lifl_bytes_ingested_total"] == len(updates) * layout.total_size


def test_same_result_as_embedded_runtime(ray_server, make_server):
    base = small_model(2)
    updates = [perturb(base, 100 + s) for s in range(6)]
    weights = [3.0, 1.0, 2.5, 7.0, 1.0, 4.0]
    results = []
    for srv in (ray_server(leaves=2), make_server(leaves=3, workers=2)):
        with Client(srv.address) as admin:
            rid = admin.open_round(base, expected=6)
            if srv.config.runtime == "ray":
                _push_spread(srv, rid, updates, weights)
            else:
                for i, (u, w) in enumerate(zip(updates, weights)):
                    admin.push(rid, u, w, f"c{i}")
            results.append(admin.pull(rid, wait_s=60))
    for k in base:
        a, b = results[0][k].astype(np.float64), results[1][k].astype(np.float64)
        if base[k].dtype.kind == "f":
            np.testing.assert_allclose(a, b, rtol=1e-6 if base[k].dtype != np.float16 else 2**-10)
        else:
            np.testing.assert_array_equal(a, b)


def test_scale_to_zero_then_cold_start_again(ray_server):
    srv = ray_server(keep_alive_s=0.5)
    base = small_model(3)
    for rnd in range(2):
        updates = [perturb(base, 10 * rnd + s) for s in range(3)]
        with Client(srv.address) as admin:
            rid = admin.open_round(base, expected=3)
            _push_spread(srv, rid, updates, [1.0, 2.0, 3.0])
            assert_matches(admin.pull(rid, wait_s=60), fedavg64(updates, [1.0, 2.0, 3.0]))
        started = list(srv.runtime.workers())
        assert started, "functions should have run"
        deadline = time.monotonic() + 30
        while (srv.snapshot().functions or srv.runtime.workers()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.snapshot().functions == () and srv.runtime.workers() == []
        for w in started:  # really gone, not just forgotten (ray.kill takes effect asynchronously)
            assert _dies(w.actor), f"{w.id} is still answering after it was stopped"
    assert metric(srv, "lifl_scale_downs_total") >= 2
    assert metric(srv, "lifl_cold_starts_total") >= 2


def test_killed_actor_mid_fold_is_replaced_and_result_exact(ray_server, monkeypatch):
    srv = ray_server(fault_fold_delay_s=0.4)
    base = small_model(4)
    updates = [perturb(base, 200 + s) for s in range(6)]
    weights = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    with Client(srv.address) as admin:
        rid = admin.open_round(base, expected=6)
        _push_spread(srv, rid, updates[:3], weights[:3], names=["c0", "c1", "c2"])
        victim = None
        deadline = time.monotonic() + 20
        while victim is None and time.monotonic() < deadline:  # a function in the middle of a fold
            victim = next((w for w in srv.snapshot().functions if w.busy), None)
            time.sleep(0.02)
        assert victim is not None
        next(w for w in srv.runtime.workers() if w.id == victim.id).kill()
        _push_spread(srv, rid, updates[3:], weights[3:], names=["c3", "c4", "c5"])
        got = admin.pull(rid, wait_s=60)
    assert_matches(got, fedavg64(updates, weights))
    assert metric(srv, "lifl_function_failures_total") >= 1
    assert metric(srv, "lifl_tasks_retried_total") >= 1


def test_node_gateway_refusals_and_relays(ray_server):
    srv = ray_server()
    node, addr = next((n, a) for n, a in sorted(srv.gateways().items()) if a != srv.address)
    base = small_model(5)
    with Client(srv.address) as admin, Client(addr) as c:
        rid = admin.open_round(base, expected=2)
        with pytest.raises(RpcFailure) as e:
            c.push(rid + 99, base, 1.0, "x")
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        bad = dict(base)
        bad["head.bias"] = bad["head.bias"][:5]
        with pytest.raises(RpcFailure) as e:
            c.push(rid, bad, 1.0, "x")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "head.bias" in e.value.message
        c.push(rid, base, 1.0, "x")
        with pytest.raises(RpcFailure) as e:  # the head deduplicates across gateways
            admin.push(rid, perturb(base, 2), 1.0, "x")
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and "content differs" in e.value.message
        assert admin.push(rid, base, 1.0, "x").duplicate   # it keeps the node's digest: a resend succeeds
        assert c.round_info(rid).accepted == 1           # relayed to the head
        admin.push(rid, perturb(base, 1), 3.0, "y")
        got = c.pull(rid, wait_s=60)                     # relayed, byte for byte
        assert_matches(got, fedavg64([base, perturb(base, 1)], [1.0, 3.0]))
        st = c.status()
        assert any(g.startswith(node + "=") for g in st.gateways)
        assert {w.node for w in st.workers} <= set(srv.gateways())


def test_lost_node_updates_are_taken_back_and_resent(ray_server, cluster):
    extra = cluster.add_node(num_cpus=2, resources={"lifl_extra": 1})
    cluster.wait_for_nodes()
    srv = ray_server()
    rt = srv.runtime
    doomed = next(n.name for n in rt.nodes.values() if n.ray_id == extra.node_id)
    base = small_model(6)
    updates = [perturb(base, 300 + s) for s in range(8)]
    weights = [float(s + 1) for s in range(8)]
    with Client(srv.address) as admin:
        rid = admin.open_round(base, expected=8, quorum=5)
        where = _push_spread(srv, rid, updates[:6], weights[:6], names=[f"c{i}" for i in range(6)])
        lost = sorted(c for c, n in where.items() if n == doomed)
        assert lost, "some clients pushed through the node that will be lost"
        assert admin.round_info(rid).accepted == 6
        cluster.remove_node(extra)
        deadline = time.monotonic() + 60
        while metric(srv, "lifl_nodes_lost_total") < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert metric(srv, "lifl_nodes_lost_total") == 1
        info = admin.round_info(rid)
        assert info.state == "open" and info.accepted == 6 - len(lost)
        assert "lost with node" in info.detail
        assert doomed not in srv.gateways()
        # those clients push again (to a surviving gateway), and the round finishes exactly
        for c in lost + ["c6", "c7"]:
            i = int(c[1:])
            admin.push(rid, updates[i], weights[i], c)
        got = admin.pull(rid, wait_s=60)
    assert_matches(got, fedavg64(updates, weights))
    assert metric(srv, "lifl_updates_lost_total") == len(lost)


def test_node_lost_while_aggregating_closes_on_quorum(ray_server, cluster, monkeypatch):
    """Every update is in, folds are slow; the node goes down mid-aggregation: what it alone
    held is dropped, the rest is re-reduced from the surviving partial sums, and the result is
    exactly the mean of the surviving updates (quorum allows it)."""
    extra = cluster.add_node(num_cpus=2, resources={"lifl_extra2": 1})
    cluster.wait_for_nodes()
    srv = ray_server(fault_fold_delay_s=1.0)
    doomed = next(n.name for n in srv.runtime.nodes.values() if n.ray_id == extra.node_id)
    base = small_model(7)
    updates = [perturb(base, 400 + s) for s in range(8)]
    weights = [float(2 + s) for s in range(8)]
    with Client(srv.address) as admin:
        rid = admin.open_round(base, expected=8, quorum=4)
        where = _push_spread(srv, rid, updates, weights)
        assert admin.round_info(rid).state == "aggregating"
        cluster.remove_node(extra)
        got = admin.pull(rid, wait_s=120)
        info = admin.round_info(rid)
    kept = [i for i in range(8) if where[f"c{i}"] != doomed]
    assert 4 <= len(kept) < 8
    assert info.accepted == len(kept) and "lost with node" in info.detail
    assert_matches(got, fedavg64([updates[i] for i in kept], [weights[i] for i in kept]))
    assert metric(srv, "lifl_updates_lost_total") == 8 - len(kept)


def _wait(cond, within_s: float = 60.0) -> bool:
    """Poll a condition on real processes (Ray nodes joining, leaving), bounded."""
    deadline = time.monotonic() + within_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.2)
    return cond()


def _capacity_request():
    """What Ray's autoscaler was last asked for (``ray.autoscaler.sdk.request_resources``), read back
    from where Ray keeps it for its (v1) autoscaler."""
    import json
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get
    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return None if raw is None else json.loads(raw)


def test_a_node_that_joins_is_used_and_one_that_leaves_idle_is_no_loss(ray_server, cluster):
    """What Ray's autoscaler does to a cluster: a node added while LIFL runs gets an agent and a
    gateway and takes leaves in the next round; removed once its functions scaled to zero, it
    is a departure, not a loss, and what its gateway counted stays in /metrics."""
    srv = ray_server(keep_alive_s=0.5, metrics_port=0)
    before = set(srv.gateways())
    joined = cluster.add_node(num_cpus=2, resources={"lifl_joined": 1})
    cluster.wait_for_nodes()
    assert _wait(lambda: len(srv.gateways()) == len(before) + 1), srv.gateways()
    (new,) = set(srv.gateways()) - before
    assert metric(srv, "lifl_nodes_joined_total") == 1
    base = small_model(8)
    updates = [perturb(base, 500 + s) for s in range(8)]
    weights = [float(1 + s) for s in range(8)]
    with Client(srv.address) as admin:
        rid = admin.open_round(base, expected=8)
        # while it runs, Ray's autoscaler is asked for room for `workers` functions
        assert _wait(lambda: _capacity_request() == [{"CPU": 1}] * 8), _capacity_request()
        where = _push_spread(srv, rid, updates, weights)
        assert new in where.values()
        assert_matches(admin.pull(rid, wait_s=60), fedavg64(updates, weights))
    assert new in {leaf.node for leaf in srv.snapshot().round(rid).leaves}
    assert _wait(lambda: not any(f.node == new for f in srv.snapshot().functions))   # scaled to zero
    assert _wait(lambda: _capacity_request() == []), _capacity_request()            # and nothing asked
    size = Layout.from_arrays(base).total_size
    assert _scrape(srv)["lifl_bytes_ingested_total"] == 8 * size     # the new node's pushes among them
    cluster.remove_node(joined)
    assert _wait(lambda: metric(srv, "lifl_nodes_left_total") == 1)
    assert metric(srv, "lifl_nodes_lost_total") == 0 and new not in srv.gateways()
    assert _scrape(srv)["lifl_bytes_ingested_total"] == 8 * size     # a node that left: its counts stay
    with Client(srv.address) as admin:      # the rest of the cluster goes on
        rid = admin.open_round(base, expected=3)
        _push_spread(srv, rid, updates[:3], weights[:3])
        assert_matches(admin.pull(rid, wait_s=60), fedavg64(updates[:3], weights[:3]))
    assert _scrape(srv)["lifl_bytes_ingested_total"] == 11 * size
def test_encoded_updates_through_node_gateways_are_exact(ray_server):
    """Each node's gateway takes encoded pushes into its own shared memory; the actors there fold
    them from the slots (the encoding travels in the slot, nothing else changes)."""
    from support import decode, wire_bytes
    srv = ray_server()
    base = small_model(3)
    updates = [perturb(base, 200 + s) for s in range(6)]
    weights = [2.0, 1.0, 4.0, 3.0, 5.0, 1.5]
    names = ["int8", "float16", "bfloat16", "int8", "raw", "bfloat16"]
    gws = sorted(srv.gateways().items())
    with Client(srv.address) as admin:
        rid = admin.open_round(base, expected=len(updates))
        for i, (u, w, nm) in enumerate(zip(updates, weights, names)):
            with Client(gws[i % len(gws)][1]) as c:
                c.push(rid, u, w, f"c{i}", encoding=nm)
        got = admin.pull(rid, wait_s=60)
    assert_matches(got, fedavg64([decode(u, wire_bytes(u, nm), nm) for u, nm in zip(updates, names)], weights))


def _assert_rounded_once(got: dict, x: dict, what: str) -> None:
    """``got`` is the float64 reference ``x`` rounded once to its dtypes: float16/float32 elements
    exactly (a step from a mean already rounded to them would miss), integers to nearest."""
    for k, g in got.items():
        if g.dtype == np.float64:
            np.testing.assert_allclose(g, x[k], rtol=1e-12, err_msg=f"{what} {k}")
        elif g.dtype.kind == "f":
            np.testing.assert_array_equal(g, x[k].astype(g.dtype), err_msg=f"{what} {k}")
        else:   # a tie may go either way
            assert np.all(np.abs(g - x[k]) <= 0.5 + 1e-9), f"{what} {k}"


def test_async_job_takes_deltas_through_every_node_gateway(ray_server):
    """An asynchronous job on the Ray runtime: deltas pushed to every node's gateway (some encoded)
    land in that node's memory and are folded there; the head decides staleness and refusals, and
    each buffer's top function (on whichever node) takes the float64 step. Each version equals a
    float64 FedBuff replay of the decoded deltas (FedAvgM step) rounded once to the model's dtypes:
    its float16 tensor as well (a step from a mean rounded to float16 would miss by ~1e-3)."""
    from support import decode, wire_bytes
    from lifl.engine.buffered import AsyncSpec
    from lifl.engine.optimizers import ServerOptimizer
    srv = ray_server(leaves=3)
    x0 = small_model(5)            # float32, float64, float16 and int64 tensors
    spec = AsyncSpec(buffer_size=3, concurrency=3, optimizer=ServerOptimizer.of("fedavgm", lr=0.9, momentum=0.5))
    gws = sorted(srv.gateways().items())
    node_gw = next(a for n, a in gws if n != srv.runtime.head)    # a node gateway, not the head's
    x, m, names = {k: v.astype(np.float64) for k, v in x0.items()}, 0.0, ["int8", "raw", "float16"]
    with Client(srv.address) as admin:
        admin.open_async(x0, spec, job="fb")
        for v in range(2):
            deltas = [{k: (perturb(x0, 10 * v + i)[k] - x0[k]).astype(x0[k].dtype) for k in x0} for i in range(3)]
            ws = [1.0 + i for i in range(3)]
            for i, (d, w) in enumerate(zip(deltas, ws)):
                with Client(gws[i % len(gws)][1]) as c:
                    r = c.push(0, d, w, f"c{i}", job="fb", base_version=v, encoding=names[i])
                assert (r.version, r.staleness) == (v + 1, 0)
            mean = fedavg64([decode(d, wire_bytes(d, nm), nm) for d, nm in zip(deltas, names)], ws)
            m = {k: 0.5 * (m[k] if v else 0.0) + mean[k] for k in x0}     # Flower's FedAvgM, in float64
            x = {k: x[k] + 0.9 * m[k] for k in x0}
            got_v, got = admin.pull_version(v + 1, job="fb", wait_s=60)
            _assert_rounded_once(got, x, f"version {v + 1}")
            with Client(node_gw) as c:   # refused at a node gateway as at the head: wrong version
                with pytest.raises(RpcFailure) as e:
                    c.push(0, deltas[0], 1.0, "late", job="fb", base_version=v + 5)
                assert e.value.code == grpc.StatusCode.OUT_OF_RANGE and f"current version is {v + 1}" in str(e.value)
        # a push by round (no base version) at a node gateway: the head's refusal, whatever round it
        # names (a buffer is a round of the tree, but only takes deltas through the job), nothing folded
        for rid in range(5):
            with Client(node_gw) as c:
                expect(grpc.StatusCode.INVALID_ARGUMENT, "is asynchronous: set base_version", c.push, rid,
                       deltas[0], 1.0, "byround", job="fb")
        info = admin.job_info("fb")
        assert (info.version, info.buffer_fill) == (2, 0)
        admin.close_job("fb")


def test_server_optimizers_step_in_top_functions_off_the_head(ray_server):
    """Server optimizers on the Ray runtime. Synchronous rounds: three of FedAvgM with clients on
    every node, then three of FedAdam with every client on one node other than the head (the
    planner puts the tree, top included, where the last round's updates arrived: the step's state
    and base model go to it through the object store and come back), each equal to Flower's own
    strategy on the same client models, the state carried over rounds. Then an asynchronous FedAdam
    job whose buffers' tops run there too (master copies cross as well): each version equals
    Flower's FedAdam stepping a float64 replay of the buffers, rounded once to the model's dtypes."""
    from lifl.engine.buffered import AsyncSpec
    from lifl.engine.optimizers import ServerOptimizer
    pytest.importorskip("flwr.server.strategy")
    srv = ray_server(leaves=2, planner="elastic")   # leaves where the last round's updates arrived
    gws = sorted(srv.gateways().items())
    far = [a for n, a in gws if n != srv.runtime.head][:1]
    rng = np.random.default_rng(7)
    crossed = []
    with Client(srv.address) as admin:
        for job, kind, kw, dtype, where in [("avgm", "fedavgm", dict(lr=0.7, momentum=0.9), np.float32,
                                             [a for _, a in gws]),
                                            ("adam", "fedadam", dict(lr=0.05), np.float64, far)]:
            x = {"w": rng.normal(size=(40, 9)).astype(dtype), "b": rng.normal(size=9).astype(dtype)}
            flower, opt, rid = FlowerStep(kind, x, **kw), ServerOptimizer.of(kind, **kw), 0
            before = srv.runtime.crossed["step"]
            for rnd in range(1, 4):
                clients = [({k: (v + rng.normal(scale=0.1, size=v.shape)).astype(dtype) for k, v in x.items()},
                            float(rng.integers(1, 30))) for _ in range(4)]
                rid = (admin.open_round(x, expected=4, job=job, optimizer=opt) if rnd == 1
                       else admin.open_round(expected=4, job=job, from_round=rid, optimizer=opt))
                for i, (u, w) in enumerate(clients):
                    with Client(where[i % len(where)]) as c:
                        c.push(rid, u, w, f"c{i}", job=job)
                got = admin.pull(rid, wait_s=60, job=job)
                for k, r in flower.round(rnd, clients).items():
                    assert got[k].dtype == dtype
                    np.testing.assert_allclose(got[k], r, rtol=1e-6, atol=1e-9 if dtype == np.float64 else 1e-7,
                                               err_msg=f"{kind} round {rnd}, {k}")
                x = {k: np.array(v) for k, v in got.items()}
            crossed.append(srv.runtime.crossed["step"] - before)
        assert crossed[1] > 0            # FedAdam's tops ran on the clients' node: its step crossed

        x0 = small_model(9)              # float32, float64, float16 and int64 tensors
        opt = dict(lr=0.05)
        admin.open_async(x0, AsyncSpec(buffer_size=2, concurrency=2, optimizer=ServerOptimizer.of("fedadam", **opt)),
                         job="fb")
        x = {k: v.astype(np.float64) for k, v in x0.items()}
        flower, before = FlowerStep("fedadam", x, **opt), srv.runtime.crossed["step"]
        for v in range(2):
            deltas = [{k: (perturb(x0, 50 + 10 * v + i)[k] - x0[k]).astype(x0[k].dtype) for k in x0} for i in range(2)]
            for i, d in enumerate(deltas):
                with Client(far[0]) as c:
                    c.push(0, d, 1.0 + i, f"c{i}", job="fb", base_version=v)
            mean = fedavg64(deltas, [1.0, 2.0])
            x = flower.round(v + 1, [({k: x[k] + mean[k] for k in x}, 1.0)])
            _, got = admin.pull_version(v + 1, job="fb", wait_s=60)
            _assert_rounded_once(got, x, f"version {v + 1}")
        admin.close_job("fb")
    assert srv.runtime.crossed["step"] > before    # its buffers' tops ran there too


def test_node_gateways_serve_the_servers_mutual_tls(ray_server, tmp_path):
    """With tls_cert/tls_key/tls_client_ca, every node's gateway serves mutual TLS (and reaches the
    head over TLS): a client with a certificate of the CA pushes through each of them, one without
    a certificate is turned away at the handshake, and the result is exact. Every gateway is a
    pool of two processes (the head's on its port, the head link on one of its own)."""
    from pki import CA
    ca = CA()
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    # node gateways present the server's certificate to the head: it must allow clientAuth too
    cert, key = ca.issue("localhost", server=True, client_too=True).write(tmp_path, "server")
    srv = ray_server(tls_cert=cert, tls_key=key, tls_client_ca=str(tmp_path / "ca.pem"), tls_operators=["ops"],
                     gateway_processes="2")
    ops = ca.issue("ops")
    gws = sorted(srv.gateways().items())
    assert len(gws) >= 2
    ups = [perturb(small_model(), i) for i in range(len(gws))]
    with Client(srv.address, root_cert=ca.pem, client_cert=ops.cert, client_key=ops.key) as admin:
        rid = admin.open_round(small_model(), expected=len(gws))
        for i, (node, addr) in enumerate(gws):
            with Client(addr, retry_s=0) as plain, pytest.raises(RpcFailure) as ei:
                plain.push(rid, ups[i], 1, f"site-{i}")
            assert ei.value.code == grpc.StatusCode.UNAVAILABLE
            site = ca.issue(f"site-{i}")
            with Client(addr, root_cert=ca.pem, client_cert=site.cert, client_key=site.key) as c:
                c.push(rid, ups[i], i + 1, f"site-{i}")
        got = admin.pull(rid, wait_s=60)
    assert_matches(got, fedavg64(ups, [i + 1 for i in range(len(gws))]))


def _agent(srv, node: str, method: str) -> dict:
    import json
    return json.loads(ray.get(getattr(srv.runtime.nodes[node].agent, method).remote(), timeout=30))


def test_node_gateways_run_the_gateway_pool(ray_server):
    """``gateway_processes = 2`` on Ray: each node's gateway is two processes on the node's port,
    writing into that node's arena, while the head still decides: a client through two processes
    of one node gets one ALREADY_EXISTS (the same content again: a duplicate success). A process
    SIGKILLed mid-stream: its client sees UNAVAILABLE, the node's slot and the head's in-flight
    stream are given back, the process is replaced, the retry succeeds; exact; nothing leaks. The
    head's /metrics sums the node pools' processes (and the head's), the killed one's counts too."""
    import os
    import signal
    import threading
    from support import expect, held_push, poll
    srv = ray_server(gateway_processes="2", metrics_port=0)
    rt = srv.runtime
    node = next(n for n in sorted(srv.gateways()) if n != rt.head)
    pool = _agent(srv, node, "pool_info")
    (a, b), agent_pid = pool["children"], _agent(srv, node, "info")["pid"]
    assert agent_pid not in (a["pid"], b["pid"]) and a["pid"] != b["pid"]
    base = small_model(9)
    ups = [perturb(base, 600 + i) for i in range(6)]
    weights = [1.0, 2.0, 3.0, 1.5, 2.5, 4.0]
    with Client(srv.address) as admin:
        rid = admin.open_round(base, expected=6)
        with Client(a["address"]) as ca, Client(b["address"], retry_s=0) as cb:
            assert ca.push(rid, ups[0], weights[0], "c0").accepted == 1
            expect(grpc.StatusCode.ALREADY_EXISTS, "content differs", cb.push, rid, ups[1], weights[0], "c0")
            again = cb.push(rid, ups[0], weights[0], "c0")
            assert again.duplicate and again.accepted == 1
            cb.push(rid, ups[1], weights[1], "c1")
        release, out = threading.Event(), {}
        t = held_push(a["address"], rid, "c2", ups[2], release, out, weight=weights[2])
        assert poll(lambda: _agent(srv, node, "stats")["slots_in_use"] == 1, 30)   # in the node's arena
        os.kill(a["pid"], signal.SIGKILL)
        t.join(30)
        assert out["c2"].code == grpc.StatusCode.UNAVAILABLE, out["c2"]
        assert poll(lambda: _agent(srv, node, "stats")["slots_in_use"] == 0 and admin.round_info(rid).in_flight == 0, 30)
        assert poll(lambda: _agent(srv, node, "pool_info")["restarts"] == 1, 30)
        assert a["pid"] not in [c["pid"] for c in _agent(srv, node, "pool_info")["children"]]
        for i, addr in ((2, srv.gateways()[node]), (3, srv.gateways()[node]), (4, srv.address)):
            with Client(addr) as c:   # the node's port (its processes, the replacement among them), the head's
                c.push(rid, ups[i], weights[i], f"c{i}")
        other = next(n for n in sorted(srv.gateways()) if n not in (rt.head, node))
        with Client(srv.gateways()[other]) as c:
            c.push(rid, ups[5], weights[5], "c5")
            got = c.pull(rid, wait_s=60)
    assert_matches(got, fedavg64(ups, weights))
    assert node in {leaf.home for leaf in srv.snapshot().round(rid).leaves}
    # bytes of every accepted push, c0's too (counted by the process SIGKILLed later, never scraped
    # before): c0 to c3 in this node's pool, c4 in the head's, c5 in the other node's
    m = _scrape(srv)
    assert m["lifl_bytes_ingested_total"] == len(ups) * Layout.from_arrays(base).total_size
    assert m['lifl_updates_rejected_total{reason="already_exists"}'] == 1   # node processes only
    assert sum(v for k, v in m.items() if k.startswith("lifl_updates_duplicate_total{")) == 1
