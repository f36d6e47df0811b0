"""The gateway pool (``gateway_processes``): real gateway processes on one port, one engine.

Pushes are driven to a chosen process through its private port (every pool process has
one; the head's own gateway is reached over the pool's Unix socket), so the cross-process
cases are deterministic; the shared port is used where any process will do.
"""
import os
import signal
import threading
import urllib.request

import grpc
import numpy as np
import pytest

from support import assert_matches, expect, fedavg64, held_push, poll
from lifl.client import Client
from lifl.config import ServerConfig
from lifl.layout import Layout
from lifl.server import EmbeddedServer
from lifl.shm import list_segments

BASE = {"w": np.zeros((300, 256), np.float32), "b": np.zeros(7, np.float64)}   # ~300 KiB
LAYOUT = Layout.from_arrays(BASE)


def update(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in BASE.items()}


def scrape(srv) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.fixture
def pool(shm_prefix):
    cfg = ServerConfig(port=0, metrics_port=0, gateway_processes="3", workers=1, leaves=1, shm_prefix=shm_prefix,
                       shm_budget_mb=1, admission_timeout_s=0.3)
    with EmbeddedServer(cfg) as srv:
        assert len(srv.pool.children()) == 3
        yield srv
    assert list_segments(shm_prefix) == []


def test_one_engine_behind_every_process(pool):
    """Dedup and the slot budget are global; every process serves Pull and GetRound; /metrics sums
    all processes; the result is exact."""
    srv = pool
    a, b, _ = (ch.address for ch in srv.pool.children())
    head = srv.pool.socket   # the head's own gateway
    ups = [update(i) for i in range(5)]
    with Client(srv.address) as admin:
        rid = admin.open_round(BASE, expected=5)
    # one client, two processes: exactly one ALREADY_EXISTS; the same content again is a duplicate
    # success (the head keeps the digest the first process computed)
    with Client(a) as ca, Client(b, retry_s=0) as cb:
        assert ca.push(rid, ups[0], num_examples=1, client_id="c0").accepted == 1
        expect(grpc.StatusCode.ALREADY_EXISTS, "content differs", cb.push, rid, ups[1], 1, "c0")
        again = cb.push(rid, ups[0], num_examples=1, client_id="c0")
        assert again.duplicate and again.accepted == 1
    # the budget (1 MiB: 3 slots of ~300 KiB) is one budget: three streams held in three
    # processes fill it, and a fourth push is refused wherever it lands
    release, out = threading.Event(), {}
    threads = [held_push(addr, rid, f"c{i}", ups[i], release, out) for i, addr in ((1, a), (2, b), (3, head))]
    assert poll(lambda: srv.arena.stats().slots_in_use == 3), srv.arena.stats()
    with Client(a, retry_s=0) as ca:
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "slot budget full", ca.push, rid, ups[0], 1, "late")
        assert ca.round_info(rid).in_flight == 3   # its begin (which asked for the slot) was taken back
    release.set()
    for t in threads:
        t.join(30)
    assert sorted(out[f"c{i}"].accepted for i in (1, 2, 3)) == [2, 3, 4], out
    with Client(srv.address) as c:   # any process
        assert c.push(rid, ups[4], num_examples=1, client_id="c4").accepted == 5
    ref = fedavg64(ups, [1.0] * 5)
    for addr in (a, b, head):
        with Client(addr) as c:
            assert_matches(c.pull(rid, wait_s=30), ref)
            assert c.round_info(rid).accepted == 5
    m = scrape(srv)
    assert m['lifl_updates_rejected_total{reason="already_exists"}'] == 1
    assert m['lifl_updates_rejected_total{reason="resource_exhausted"}'] == 1
    assert m["lifl_bytes_ingested_total"] == 5 * LAYOUT.total_size   # bytes written by three processes


def test_sigkilled_gateway_process(pool):
    """A gateway process killed mid-stream: its client sees UNAVAILABLE, the slot comes back,
    the process is replaced, the client's push again succeeds, nothing leaks (fixture); what it
    had counted stays in /metrics, though nothing scraped it before it died."""
    srv = pool
    victim = srv.pool.children()[0]
    ups = [update(i) for i in range(2)]
    with Client(srv.address) as admin:
        rid = admin.open_round(BASE, expected=2)
        warm = admin.open_round(BASE, expected=1)
    with Client(victim.address) as c:   # counted by the victim alone, and never scraped before it dies
        c.push(warm, ups[0], num_examples=1, client_id="w")
    release, out = threading.Event(), {}
    t = held_push(victim.address, rid, "c0", ups[0], release, out)
    assert poll(lambda: srv.arena.stats().slots_in_use == 1)
    os.kill(victim.proc.pid, signal.SIGKILL)
    t.join(30)
    assert out["c0"].code == grpc.StatusCode.UNAVAILABLE, out["c0"]
    assert poll(lambda: srv.arena.stats().slots_in_use == 0 and srv.pool.restarts == 1)
    assert poll(lambda: victim.proc.pid not in [c.proc.pid for c in srv.pool.children()])
    with Client(srv.address) as c:   # the retry, through the shared port
        assert c.round_info(rid).in_flight == 0
        c.push(rid, ups[0], num_examples=1, client_id="c0")
    with Client(srv.pool.children()[0].address) as c:   # the replacement serves
        c.push(rid, ups[1], num_examples=1, client_id="c1")
        assert_matches(c.pull(rid, wait_s=30), fedavg64(ups, [1.0, 1.0]))
    # the dead process's count (made after any scrape), plus the two pushes since
    assert scrape(srv)["lifl_bytes_ingested_total"] == 3 * LAYOUT.total_size


def test_setting():
    assert ServerConfig(gateway_processes="4").gateway_count() == 4
    assert ServerConfig(gateway_processes=2).gateway_count() == 2
    auto = ServerConfig().gateway_count()
    assert auto == (1 if (os.cpu_count() or 1) <= 4 else min(8, os.cpu_count() // 2))
    for bad in ("0", "lots", -1):
        with pytest.raises(ValueError, match="gateway_processes"):
            ServerConfig(gateway_processes=bad).validate()


def test_async_deltas_through_a_pool_process(pool):
    """Asynchronous jobs live in the head: a delta pushed to a pool process is relayed there whole."""
    from lifl.engine.buffered import AsyncSpec
    srv = pool
    x0 = {k: np.ones_like(v) for k, v in BASE.items()}
    deltas = [update(10), update(11)]
    with Client(srv.address) as admin:
        admin.open_async(x0, AsyncSpec(buffer_size=2, concurrency=2), job="fb")
    for i, ch in enumerate(srv.pool.children()[:2]):
        with Client(ch.address) as c:
            r = c.push(0, deltas[i], num_examples=1, client_id=f"d{i}", job="fb", base_version=0)
            assert r.staleness == 0
    with Client(srv.pool.children()[0].address) as c:
        version, got = c.pull_version(1, job="fb", wait_s=30)
    mean = fedavg64(deltas, [1.0, 1.0])
    assert version == 1
    for k in BASE:   # x1 = x0 + mean delta (docs/async.md, sgd lr 1), rounded once to the model's dtype
        np.testing.assert_allclose(got[k], x0[k] + mean[k], rtol=0, atol=4 * np.finfo(BASE[k].dtype).eps)
    # a push by round (no base version) is refused as the head refuses it, whatever round it names
    # (the open buffer is round 2 of the tree: it takes deltas only through the job's checks)
    for rid in range(3):
        with Client(srv.pool.children()[1].address) as c:
            expect(grpc.StatusCode.INVALID_ARGUMENT, "is asynchronous: set base_version", c.push, rid, deltas[0],
                   num_examples=1, client_id="byround", job="fb")
    with Client(srv.address) as admin:
        assert admin.job_info("fb").buffer_fill == 0


def test_one_rate_limit_for_every_process(clocked, tmp_path):
    """A client's bucket is the head's, whichever process it reaches: calls relayed by one process
    and a push taken by another draw on it, and the head's injected clock refills it."""
    from lifl import tokens
    tokens.keygen(tmp_path / "k.pem", tmp_path / "k.pub")
    key = (tmp_path / "k.pem").read_bytes()
    srv, clock = clocked(gateway_processes="2", rate_limit_per_s=2.0, rate_limit_burst=2, metrics_port=0,
                         token_key=str(tmp_path / "k.pub"))
    a, b = (ch.address for ch in srv.pool.children())
    op_tok, a_tok = tokens.issue(key, "ops", "*", "operator"), tokens.issue(key, "a", "default")
    with Client(a, token=op_tok) as op:
        rid = op.open_round(BASE, expected=1)
    with Client(a, token=a_tok, retry_s=0) as via_a, Client(b, token=a_tok, retry_s=0) as via_b:
        via_a.round_info(rid)                                   # relayed by process a: the head's bucket
        via_b.round_info(rid)                                   # by process b: the same bucket, now empty
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "retry in 0.500 s", via_b.push, rid, update(0), 1, "a")
        expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "retry in 0.500 s", via_a.round_info, rid)
        with Client(b, token=op_tok) as op:
            info = op.round_info(rid)
            assert (info.accepted, info.in_flight) == (0, 0)     # the refused push stored nothing
        clock.advance(0.5)
        via_a.push(rid, update(0), 1, "a")                      # refilled by the head's clock
        clock.advance(0.5)
        assert_matches(via_b.pull(rid, wait_s=30), fedavg64([update(0)], [1]))
    assert scrape(srv)["lifl_auth_refused_total{reason=\"rate\"}"] == 2
    assert srv.arena.stats().slots_in_use == 0


def test_mutual_tls_identities_through_every_process(make_server, tmp_path):
    """Under mutual TLS a pool process authenticates its caller by certificate and relays the
    principal: an operator administers and a client pulls through any process (the head, behind
    the relay, sees no certificate of theirs), a client may not administer, and pushes as itself."""
    from pki import CA
    ca = CA()
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    cert, key = ca.issue("localhost", server=True).write(tmp_path, "server")
    srv = make_server(gateway_processes="2", tls_cert=cert, tls_key=key, tls_client_ca=str(tmp_path / "ca.crt"),
                      tls_operators=["ops"])
    address = srv.address.replace("127.0.0.1", "localhost")   # the shared port: only pool processes listen
    ops, phone = ca.issue("ops"), ca.issue("phone-1")
    ups = [update(i) for i in range(2)]

    def as_(who):
        return Client(address, root_cert=ca.pem, client_cert=who.cert, client_key=who.key, retry_s=0)
    with as_(ops) as op, as_(phone) as c:
        rid = op.open_round(BASE, expected=2)                  # relayed to the head as the operator
        expect(grpc.StatusCode.PERMISSION_DENIED, "not administer", c.close_round, rid)
        expect(grpc.StatusCode.PERMISSION_DENIED, "operators only", c.status)
        expect(grpc.StatusCode.PERMISSION_DENIED, "push as yourself", c.push, rid, ups[0], 1, "phone-2")
        assert c.round_info(rid).accepted == 0 and len(op.status().rounds) == 1
        c.push(rid, ups[0], 1, "phone-1")
        op.push(rid, ups[1], 3, "ops")
        assert_matches(c.pull(rid, wait_s=30), fedavg64(ups, [1, 3]))
    assert srv.arena.stats().slots_in_use == 0


KILLED_HEAD = r"""
import signal, sys
from lifl.config import ServerConfig
from lifl.server import EmbeddedServer
srv = EmbeddedServer(ServerConfig(port=0, metrics_port=-1, gateway_processes="2", workers=1, leaves=1,
                                  shm_prefix=sys.argv[1], shm_budget_mb=1)).start()
print(srv.pool.directory, *(c.proc.pid for c in srv.pool.children()), flush=True)
signal.pause()   # until the test kills it
"""


def test_a_killed_heads_pool_directory_is_removed_by_the_next_pool(shm_prefix):
    """A head SIGKILLed leaves its pool's directory (sockets, the children's metrics files) and its
    shared memory; its children exit (their stdin closes); the next server's pool removes the
    directory, its arena the segments."""
    import subprocess
    import sys
    from lifl.shm import pid_alive
    p = subprocess.Popen([sys.executable, "-c", KILLED_HEAD, shm_prefix], stdout=subprocess.PIPE, text=True)
    try:
        directory, *kids = p.stdout.readline().split()
    finally:
        p.kill()
        p.wait()
    assert os.path.isdir(directory)
    assert poll(lambda: not any(pid_alive(int(k)) for k in kids), 30)
    cfg = ServerConfig(port=0, metrics_port=-1, gateway_processes="2", workers=1, leaves=1, shm_prefix=shm_prefix,
                       shm_budget_mb=1)
    with EmbeddedServer(cfg) as srv:
        assert not os.path.exists(directory)
        mine = srv.pool.directory
        assert os.path.isdir(mine) and mine != directory
    assert not os.path.exists(mine)   # a pool that closes removes its own


def test_replaced_again_and_again_the_pool_keeps_files_for_live_processes_and_every_count(pool):
    """Each process killed in turn after a push of its own (none scraped before it died): /metrics
    still counts every push, and the pool's metrics directory holds files of live processes only."""
    srv = pool
    ups = [update(i) for i in range(3)]
    with Client(srv.address) as admin:
        rid = admin.open_round(BASE, expected=3)
    for i in range(3):
        victim = srv.pool.children()[0]
        with Client(victim.address) as c:
            c.push(rid, ups[i], num_examples=1, client_id=f"k{i}")
        os.kill(victim.proc.pid, signal.SIGKILL)
        assert poll(lambda: srv.pool.restarts == i + 1 and victim.proc.pid not in
                    [ch.proc.pid for ch in srv.pool.children()])
    m = scrape(srv)
    assert m["lifl_bytes_ingested_total"] == 3 * LAYOUT.total_size
    assert m['lifl_updates_received_total{job="default"}'] == 3
    live = {str(ch.proc.pid) for ch in srv.pool.children()}
    pids = {f.rsplit("_", 1)[1].removesuffix(".db") for f in os.listdir(srv.pool.metrics_dir)}
    assert pids <= live, (pids, live)
    with Client(srv.address) as c:
        assert_matches(c.pull(rid, wait_s=30), fedavg64(ups, [1.0] * 3))
